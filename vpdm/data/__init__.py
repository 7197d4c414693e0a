"""Data: dataset layouts (MVTec, VisA, folders), image and mask decoding, the demo generator."""
