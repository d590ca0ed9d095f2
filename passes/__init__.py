"""qdiff passes."""
