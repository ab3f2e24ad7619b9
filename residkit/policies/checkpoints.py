"""Residual checkpoints: one global layer's residuals, appended in place.

KV-Direct's layer checkpoints (:mod:`residkit.policies.kvdirect`) keep the residual entering a
layer for every token, from the moment it is computed, so that the layer's K/V can be
recomputed once the token leaves the active window.
"""

from jaxtyping import Float
from torch import Tensor

from residkit._bridge import nbytes

__all__ = ["ResidualCheckpoints"]


class ResidualCheckpoints:
    """One global layer's residual checkpoints, ``[batch, pos, d_model]``, appended in place.

    Rows live in one buffer with room to grow, so a step copies only its own new rows. Merging
    a list of chunks instead copies every stored row at every step (O(T) a step). When the
    buffer is full it is reallocated with ``1 / GROWTH`` spare rows: the copy then costs ``GROWTH`` rows a step, amortised, and the
    spare rows are reported (:attr:`reserved_bytes`), never hidden in :attr:`nbytes`.

    Rows are views of the buffer; a chunk starting at row ``s`` is aligned like a fresh tensor
    whenever ``s * d_model * 4`` bytes is a multiple of 64 (``residkit.projector.project_rows``
    copies a view that is not, before its GEMM).

    Examples:
        >>> import torch
        >>> store = ResidualCheckpoints()
        >>> store.append(torch.ones(1, 8, 4)), store.append(torch.zeros(1, 1, 4))  # room for 9
        (0, 0)
        >>> store.append(torch.zeros(1, 1, 4))  # full: 9 rows (144 B) copied into room for 11
        144
        >>> store.rows().shape, store.nbytes, store.reserved_bytes
        (torch.Size([1, 10, 4]), 160, 176)
    """

    GROWTH = 8

    def __init__(self) -> None:
        self.buffer: Tensor | None = None
        self.length = 0

    def append(self, rows: Float[Tensor, "batch pos d_model"]) -> int:
        """Add rows after the stored ones; return the bytes of the old buffer if it was regrown.

        Those bytes are alive while the stored rows are copied into the new buffer (or 0).

        Raises:
            ValueError: ``rows`` is not ``[batch, pos, d_model]`` like the rows already stored.
        """
        if rows.dim() != 3 or (
            self.buffer is not None
            and (rows.shape[:-2], rows.shape[-1]) != (self.buffer.shape[:-2], self.buffer.shape[-1])
        ):
            stored = None if self.buffer is None else tuple(self.rows().shape)
            raise ValueError(
                f"rows of shape {tuple(rows.shape)} cannot follow checkpoints of shape {stored}: "
                "expected [batch, pos, d_model] with the same batch and d_model"
            )
        need = self.length + rows.shape[-2]
        grown = 0
        if self.buffer is None or need > self.buffer.shape[-2]:
            capacity = need + need // self.GROWTH
            new = rows.new_empty(*rows.shape[:-2], capacity, rows.shape[-1])
            if self.buffer is not None:
                new[..., : self.length, :].copy_(self.rows())
                grown = nbytes(self.buffer)
            self.buffer = new
        self.buffer[..., self.length : need, :].copy_(rows)
        self.length = need
        return grown

    def rows(self) -> Float[Tensor, "batch pos d_model"]:
        """The stored rows (a view).

        Raises:
            ValueError: nothing has been stored yet.
        """
        if self.buffer is None:
            raise ValueError("no checkpoints stored yet: append rows first")
        return self.buffer[..., : self.length, :]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows: what the checkpoints cost."""
        if self.buffer is None:
            return 0
        per_row = self.buffer.numel() // self.buffer.shape[-2] * self.buffer.element_size()
        return self.length * per_row

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated, spare rows included."""
        return nbytes(self.buffer)
