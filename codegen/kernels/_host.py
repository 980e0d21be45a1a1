"""Integer helpers for the kernels' host wrappers.

triton.cdiv and triton.next_power_of_2 are @triton.jit functions: called from Python each one goes
through JITFunction.__call__ and costs ~1.5 us (measured, triton 3.9), and a launch wrapper calls
several. Host code uses these plain versions; kernels keep tl.cdiv.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
