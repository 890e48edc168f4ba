"""The maths: calibration metrics, phases, calibration directions, the unembedding's null space."""
