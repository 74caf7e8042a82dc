"""Counting kernel launches: every launch of the package goes through ``kernels._common.launch``,
which honours ``kernels._common.override(launch_hook=...)``; this hook counts and still launches."""
import collections
import contextlib


@contextlib.contextmanager
def count_kernel_launches():
    """Inside: a Counter of launches by kernel name (e.g. ``_project_kernel``); kernels still run."""
    from subspace_ops.kernels import _common

    counts = collections.Counter()

    def hook(kernel, grid, args, kwargs):
        counts[kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__] += 1
        return kernel[grid](*args, **kwargs)

    with _common.override(launch_hook=hook):
        yield counts
