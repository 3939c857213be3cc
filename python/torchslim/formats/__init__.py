"""Weight formats: their layouts, packing and validation."""
