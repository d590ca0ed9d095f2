"""Exceptions raised by qdiff. Every message names the node, file or field at fault."""


class QdiffError(RuntimeError):
    """Base class of all qdiff errors."""


class ConfigError(QdiffError, ValueError):
    """An invalid QuantConfig or backend option."""


class PlanFileError(QdiffError):
    """A plan file that cannot be read: missing, truncated, not a plan, unknown version, bad shapes."""


class PlanMismatchError(QdiffError):
    """A plan that does not fit the graph being compiled (another model, another graph)."""


class CalibrationError(QdiffError):
    """Calibration saw something it cannot quantize (NaN/inf, no timestep where one is needed)."""


class MissingPlanError(QdiffError):
    """The qdiff backend was used without a plan."""
