"""Row-sharded matrices (FSDP2's ``Shard(0)``) and the few collectives the subspace math needs.

The math of a low-rank matrix is written once, against a *communicator* ``comm`` that says how the
matrix's rows are spread (docs/design.md, "FSDP2"):

* ``LOCAL``: one process holds the whole matrix; every collective is the identity. The single-process
  optimizer runs the same code with it, so a sharded run and one process differ only by the order
  of floating-point sums.
* ``Rows``: rank ``i`` of a 1-D device mesh holds rows ``[offset, offset + rows)`` of an (m x n)
  matrix, ``torch.chunk`` style (``chunk = ceil(m / world)``; the last ranks may hold fewer rows, or
  none), as ``fully_shard`` lays out parameters and gradients.

What the math asks of a communicator:

* ``sum_(t)``: the sum over ranks of a small tensor (an all-reduce, in place): ``Pᵀ G`` of a
  row-sharded basis, the Gram matrices of the range finder, norms.
* ``orthonormalize(Y)``: the Q factor, ``diag(R) ≥ 0``, of a row-sharded tall matrix (TSQR: a local
  QR, an all-gather of the k x k R factors, a QR of their stack). Equals ``projectors.orthonormalize``
  of the whole matrix (the thin QR with a positive diagonal is unique).
* ``all_rows(X)``: the whole of a row-sharded thin matrix on every rank (all-gather).
* ``local_rows(X)``: this rank's rows of a matrix every rank holds whole.
* ``scatter_cols(R)`` / ``gather_cols(N)``: the reduce-scatter / all-gather of a small (r x n)
  matrix over its columns, for the left side's column-sharded moments.
* ``gather_to(X, owner)``, ``scatter_rows`` / ``broadcast_(t, owner)``: the exact SVD's refresh, the
  one that moves whole gradients (each left basis goes back as rows, each right one whole).

Every ``Rows`` collective adds its bytes to ``Rows.sent`` (per kind), which tests and ``bench`` read.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import Tensor

# What a stored state tensor of a row-sharded matrix is: sharded like the weight's rows, sharded over
# its columns (the left side's r x n moments), or the same on every rank.
ROWS, COLS, REPLICATE = "rows", "cols", "replicate"


def _orthonormalize(Y: Tensor) -> Tensor:
    from .projectors.base import orthonormalize

    return orthonormalize(Y)


class Local:
    """The communicator of a matrix held whole by one process: every collective is the identity."""

    world = 1
    sharded = False

    def global_rows(self, local_rows: int) -> int:
        return local_rows

    def sum_(self, t: Tensor) -> Tensor:
        return t

    def orthonormalize(self, Y: Tensor) -> Tensor:
        return _orthonormalize(Y)

    def all_rows(self, X: Tensor) -> Tensor:
        return X

    def local_rows(self, X: Tensor) -> Tensor:
        return X

    def scatter_cols(self, R: Tensor) -> Tensor:
        return R

    def gather_cols(self, N: Tensor, n: int) -> Tensor:
        return N

    def col_range(self, n: int) -> tuple:
        return 0, n


LOCAL = Local()


def all_finite(comm, *tensors: Tensor) -> bool:
    """True when every value of ``tensors`` is finite on every rank (one scalar all-reduce when
    sharded, so all ranks take the same branch). Meta tensors have no values: True."""
    if any(t.device.type == "meta" for t in tensors):
        return True
    if not comm.sharded:
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    bad = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    for t in tensors:
        bad += (~torch.isfinite(t)).sum()
    return float(comm.sum_(bad)) == 0.0


def part_comm(comm, part_side: str):
    """The communicator of one part of a basis: a left part has the matrix's rows (sharded like
    them), a right part is whole on every rank."""
    return comm if part_side == "left" else LOCAL


def orthonormalize_basis(basis, comm=LOCAL):
    """``basis`` with orthonormalised parts (``projectors.orthonormalize``; a TSQR for a row-sharded
    left part)."""
    from .basis import Basis

    return Basis.from_parts(basis.side, [part_comm(comm, s).orthonormalize(P)
                                         for s, P in zip(Basis.part_sides(basis.side), basis.parts)])


def broadcast_basis(comm, basis, owner: int, side: str, m: int, n: int, rank: int, dtype, device):
    """The basis rank ``owner`` computed from the whole gradient (a ``Basis`` there, or None when it
    could not compute one), on every rank: left parts as this rank's rows (scattered), right parts
    whole (broadcast). A flag first; None everywhere when the owner had none."""
    from .basis import Basis

    mine = comm.rank == owner
    ok = torch.tensor(1.0 if (mine and basis is not None) else 0.0, device=device)
    if float(comm.broadcast_(ok, owner)) == 0.0:
        return None
    parts = []
    for i, (part_side, rows) in enumerate(zip(Basis.part_sides(side), Basis.part_rows(side, m, n))):
        P = basis.parts[i].to(dtype).contiguous() if mine else None
        if part_side == "left":
            parts.append(comm.scatter_rows(P, owner, rank, dtype, device))
        else:
            P = P if mine else torch.empty((rows, rank), dtype=dtype, device=device)
            parts.append(comm.broadcast_(P, owner))
    return Basis.from_parts(side, parts)


def owner_compute(comm, G: Tensor, side: str, rank: int, owner: int, compute):
    """``compute(whole G)`` (a ``Basis`` or None) run on rank ``owner`` of a row-sharded G, the
    result on every rank (``broadcast_basis``): the one refresh that moves whole gradients."""
    whole = comm.gather_to(G, owner)
    basis = compute(whole) if whole is not None else None
    return broadcast_basis(comm, basis, owner, side, comm.m, G.shape[1], rank, G.dtype, G.device)


def dtensor_class():
    """``torch.distributed.tensor.DTensor``, or None for a torch built without distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without distributed
        return None
    return DTensor


def local(t):
    """The local shard of a DTensor (a view sharing its storage), anything else as it is."""
    lt = getattr(t, "_local_tensor", None)
    return t if lt is None else lt


def is_dtensor(t) -> bool:
    DTensor = dtensor_class()
    return DTensor is not None and isinstance(t, DTensor)


def placement_error(p, where: str) -> Optional[str]:
    """Why a DTensor parameter of a low-rank group cannot be stepped (None when it can): only dim-0
    sharding on a 1-D mesh (``fully_shard``'s layout) is supported."""
    from torch.distributed.tensor import Shard

    placements = tuple(p.placements)
    if p.device_mesh.ndim == 1 and len(placements) == 1 and placements[0] == Shard(0):
        return None
    return (
        f"{where} (shape {tuple(p.shape)}) is a DTensor with placements {placements} on a "
        f"{p.device_mesh.ndim}-D mesh; a low-rank matrix must be sharded over its rows on a 1-D mesh "
        "(placements (Shard(dim=0),), what torch.distributed.fsdp.fully_shard makes). Tensor parallelism, "
        "Shard(1) and 2-D meshes (HSDP) are not supported: shard the model with fully_shard over one mesh "
        "dimension, or put this parameter in a group without 'rank'"
    )


class Rows:
    """Rank ``rank`` of ``world`` holds rows ``[offset, offset + rows)`` of an (m x ...) matrix, as
    ``fully_shard`` (``Shard(0)`` on a 1-D mesh) lays it out. Collectives run on the mesh's group;
    ``sent`` counts the bytes this rank passed to each kind of collective."""

    sharded = True
    sent: Counter = Counter()  # shared by every Rows: the bytes this process sent, per collective

    def __init__(self, mesh, m: int):
        self.mesh = mesh
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.m = m
        self.chunk = -(-m // self.world)
        self.offset = min(self.rank * self.chunk, m)
        self.rows = max(0, min(self.chunk, m - self.offset))

    @classmethod
    def of(cls, p) -> "Rows":
        return cls(p.device_mesh, p.shape[0])

    def global_rows(self, local_rows: int) -> int:
        return self.m

    # -- collectives -------------------------------------------------------------------------------
    def _count(self, kind: str, t: Tensor) -> None:
        Rows.sent[kind] += t.numel() * t.element_size()

    def sum_(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        self._count("all_reduce", t)
        dist.all_reduce(t, group=self.group)
        return t

    def _all_gather(self, x: Tensor) -> Tensor:
        """(world * x.shape[0], ...) of every rank's equal-size ``x``, in rank order."""
        import torch.distributed as dist

        x = x.contiguous()
        out = x.new_empty((self.world * x.shape[0],) + tuple(x.shape[1:]))
        self._count("all_gather", x)
        dist.all_gather_into_tensor(out, x, group=self.group)
        return out

    def _pad_rows(self, X: Tensor, rows: int) -> Tensor:
        if X.shape[0] == rows:
            return X
        out = X.new_zeros((rows,) + tuple(X.shape[1:]))
        out[: X.shape[0]] = X
        return out

    def all_rows(self, X: Tensor) -> Tensor:
        return self._all_gather(self._pad_rows(X, self.chunk))[: self.m]

    def local_rows(self, X: Tensor) -> Tensor:
        return X[self.offset:self.offset + self.rows]

    def orthonormalize(self, Y: Tensor) -> Tensor:
        """TSQR with ``diag(R) ≥ 0``: a local QR, an all-gather of the (k x k) R factors (zero rows
        padding a shard of fewer than k rows), a QR of their stack; Q = local Q @ this rank's block."""
        Yw = Y if Y.dtype == torch.float64 else Y.float()
        k = Yw.shape[1]
        Q1, R1 = torch.linalg.qr(Yw)  # (rows, min(rows, k)), (min(rows, k), k)
        stacked = self._all_gather(self._pad_rows(R1, k))
        Q2, R = torch.linalg.qr(stacked)
        Q2 = Q2 * torch.where(torch.diagonal(R) < 0, -1.0, 1.0).to(Q2.dtype)
        return Q1 @ Q2[self.rank * k: self.rank * k + R1.shape[0]]

    def col_range(self, n: int) -> tuple:
        """(start, count) of this rank's columns of an (r x n) matrix sharded over its columns."""
        chunk = -(-n // self.world)
        start = min(self.rank * chunk, n)
        return start, max(0, min(chunk, n - start))

    def scatter_cols(self, R: Tensor) -> Tensor:
        """This rank's columns of the sum over ranks of ``R`` (r x n): a reduce-scatter."""
        import torch.distributed as dist

        n = R.shape[1]
        chunk = -(-n // self.world)
        Rt = self._pad_rows(R.mT, chunk * self.world).contiguous()  # columns as rows: dim 0 is scattered
        out = Rt.new_empty((chunk,) + tuple(Rt.shape[1:]))
        self._count("reduce_scatter", Rt)
        dist.reduce_scatter_tensor(out, Rt, group=self.group)
        _, count = self.col_range(n)
        return out[:count].mT.contiguous()

    def gather_cols(self, N: Tensor, n: int) -> Tensor:
        """The whole (r x n) matrix from every rank's columns (an all-gather)."""
        chunk = -(-n // self.world)
        return self._all_gather(self._pad_rows(N.mT, chunk))[:n].mT.contiguous()

    def gather_to(self, X: Tensor, owner: int) -> Optional[Tensor]:
        """The whole row-sharded ``X`` on rank ``owner`` of the mesh (None on the others)."""
        import torch.distributed as dist

        X = self._pad_rows(X, self.chunk).contiguous()
        self._count("gather", X)
        dst = dist.get_global_rank(self.group, owner)
        if self.rank == owner:
            parts = [torch.empty_like(X) for _ in range(self.world)]
            dist.gather(X, parts, dst=dst, group=self.group)
            return torch.cat(parts)[: self.m]
        dist.gather(X, None, dst=dst, group=self.group)
        return None

    def scatter_rows(self, X: Optional[Tensor], owner: int, cols: int, dtype, device) -> Tensor:
        """This rank's rows of the whole (m x cols) ``X`` that rank ``owner`` holds (None elsewhere):
        a scatter, so each rank receives only its rows."""
        import torch.distributed as dist

        out = torch.empty((self.chunk, cols), dtype=dtype, device=device)
        src = dist.get_global_rank(self.group, owner)
        if self.rank == owner:
            padded = self._pad_rows(X, self.chunk * self.world).contiguous()
            self._count("scatter", padded)
            dist.scatter(out, list(padded.chunk(self.world)), src=src, group=self.group)
        else:
            dist.scatter(out, None, src=src, group=self.group)
        return out[: self.rows].clone()

    def broadcast_(self, t: Tensor, owner: int) -> Tensor:
        import torch.distributed as dist

        self._count("broadcast", t)
        dist.broadcast(t, src=dist.get_global_rank(self.group, owner), group=self.group)
        return t

    # -- state tensors -----------------------------------------------------------------------------
    def wrap(self, t: Tensor, kind: str, n: Optional[int] = None):
        """A DTensor on this mesh from the local tensor ``t``: ``ROWS`` (this rank's rows of an (m x ...)
        tensor), ``COLS`` (this rank's columns of an (r x n) tensor) or ``REPLICATE``."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if kind == ROWS:
            shape, placement = (self.m,) + tuple(t.shape[1:]), Shard(0)
        elif kind == COLS:
            shape, placement = (t.shape[0], n) + tuple(t.shape[2:]), Shard(1)
        else:
            shape, placement = tuple(t.shape), Replicate()
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t, self.mesh, (placement,), run_check=False, shape=torch.Size(shape),
                                  stride=stride)


class ShardedState:
    """One row-sharded matrix's optimizer state seen through its local shards.

    The optimizer keeps the state as DTensors (what ``torch.distributed.checkpoint`` saves and
    reshards); the math reads and writes local tensors. Reading a key gives the local shard; writing
    one wraps the local tensor as a DTensor with the key's placement (``placement(key)``). Scalars
    (0-d tensors) are kept as they are."""

    __slots__ = ("state", "rows", "placement", "n")

    def __init__(self, state: dict, rows: Rows, placement, n: int):
        self.state, self.rows, self.placement, self.n = state, rows, placement, n

    def __getitem__(self, key):
        return local(self.state[key])

    def get(self, key, default=None):
        v = self.state.get(key, default)
        return v if v is default else local(v)

    def __contains__(self, key) -> bool:
        return key in self.state

    def __setitem__(self, key, value) -> None:
        if isinstance(value, Tensor) and value.dim() > 0 and not is_dtensor(value):
            value = self.rows.wrap(value, self.placement(key), self.n)
        self.state[key] = value

    def update(self, items) -> None:
        for key, value in dict(items).items():
            self[key] = value

    def setdefault(self, key, value):
        if key not in self.state:
            self[key] = value
        return self[key]

    def keys(self):
        return self.state.keys()

    def __iter__(self):
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)

    def __bool__(self) -> bool:
        return bool(self.state)
