"""Small layers shared by the X-Codec2 modules."""
