"""qdiff: post-training quantization of diffusion denoisers as a ``torch.compile`` backend.

    cfg  = qcompile.QuantConfig.preset("w8a8-int8")
    plan = qcompile.calibrate(unet, lambda m: sample(m, noise), cfg)
    qunet = torch.compile(unet, backend="qdiff", options={"plan": plan})
    print(qcompile.inspect(qunet))
"""

__version__ = "0.1.0"

from .config import ActSpec, AllocationSpec, CalibrationSpec, FirstLastPolicy, Format, OpKind, QuantConfig, RangeMethod, Rounding, WeightSpec  # noqa: E402
from .errors import CalibrationError, ConfigError, MissingPlanError, PlanFileError, PlanMismatchError, QdiffError  # noqa: E402
from .plan import QuantPlan  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .backend import qdiff_backend  # noqa: E402
from .inspect import inspect  # noqa: E402
from .decorator import quantize  # noqa: E402
from .dispatch import GroupDispatch, compile  # noqa: E402

__all__ = [
    "ActSpec", "AllocationSpec", "CalibrationSpec", "FirstLastPolicy", "Format", "OpKind", "QuantConfig", "RangeMethod", "Rounding", "WeightSpec",
    "CalibrationError", "ConfigError", "MissingPlanError", "PlanFileError", "PlanMismatchError", "QdiffError",
    "QuantPlan", "calibrate", "qdiff_backend", "inspect", "quantize", "compile", "GroupDispatch", "__version__",
]
