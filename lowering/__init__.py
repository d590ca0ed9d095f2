"""qdiff lowering."""
