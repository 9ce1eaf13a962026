"""Closed-form derivative kernels that make the second-order meta-gradient fast."""
