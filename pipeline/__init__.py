"""skypipe: region-scale SkySense V2 pipeline."""

__version__ = "0.1.0"
