"""The gradient engine: record a forward, then each explained score's own gradient at the
recorded tensors' rows (one backward of the sum when scores own their rows, a batched backward
when they share them), and nothing vocabulary-sized or below the recorded layers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from groundcam.capture import Recorder, Unfold
from groundcam.contract import RecordSpec, Scores
from groundcam.errors import InputError
from groundcam.methods import Method
from groundcam.threads import this_thread


def record(
    method: Method,
    spec: RecordSpec,
    run: Callable[[], Scores],
    pairs: int,
    image_index: torch.Tensor,
    chunk: int,
    differentiable: bool = False,
    root: HeadRows | None = None,
) -> tuple[Scores, list[torch.Tensor], list[torch.Tensor] | None]:
    """Run `run()` (a forward returning Scores) under the recorder; per explained score, the
    recorded tensors' rows and their gradients. For gradient methods the forward keeps no
    graph below the recorded layers and no parameter is made to require grad (the recorder
    cuts there, see `Recorder`). `differentiable`: nothing is cut or detached, and the
    gradients are taken with `create_graph`, so maps made of them reach the parameters (the
    AMC loss trains through them). `root`: score b reads the model only through row
    `root.rows[b]` of the tensor `root.x` (an LM head's input), where the batched backward
    starts (`rooted_grads`)."""
    grad_mode = torch.enable_grad() if method.needs_grad else torch.no_grad()
    frozen = method.needs_grad and not differentiable
    with grad_mode, Recorder(spec.points, leaf=frozen, cut=frozen) as rec:
        scores = run()
        recorded, unfolds = rec.tensors(), rec.unfolds()
        rows = [
            image_index
            if (p.per_image or spec.per_image) and unfold is None
            else torch.arange(pairs, device=image_index.device)
            for p, unfold in zip(spec.points, unfolds, strict=True)
        ]
        grads = None
        if method.needs_grad and root is not None and root.ready:
            grads = rooted_grads(scores.explained, root, recorded, rows, chunk, unfolds)
        elif method.needs_grad:
            grads = per_target_grads(
                scores.explained, recorded, rows, chunk, differentiable, unfolds
            )
    if not differentiable:
        recorded = [t.detach() for t in recorded]
    recorded = [u(t) if u else t for t, u in zip(recorded, unfolds, strict=True)]
    recorded = [take_rows(t, r) for t, r in zip(recorded, rows, strict=True)]
    return scores, recorded, grads


class HeadRows:
    """While open, `head` (a language-model head) reads only rows `rows` of its input `[1, T, C]`
    (the decoder positions whose logits are explained): no vocabulary-sized logits for the other
    positions, and `x` keeps the whole input, where `rooted_grads` starts the batched backward."""

    def __init__(self, head: torch.nn.Module, rows: torch.Tensor):
        self.head, self.rows = head, rows
        self.x: torch.Tensor | None = None
        self._handle = None

    def _pick(self, module, args):
        x = args[0]
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(f"LM head input of shape {tuple(x.shape)}: one sequence expected")
        self.x = x
        return (x[:, self.rows.to(x.device)], *args[1:])

    @property
    def ready(self) -> bool:
        """Whether the head ran and its input carries a graph to start from."""
        return self.x is not None and self.x.requires_grad

    def __enter__(self) -> HeadRows:
        self.x = None
        self._handle = self.head.register_forward_pre_hook(this_thread(self._pick))
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def rooted_grads(
    explained: torch.Tensor,
    root: HeadRows,
    recorded: list[torch.Tensor],
    rows: list[torch.Tensor],
    chunk: int,
    unfolds: list[Unfold | None] | None = None,
) -> list[torch.Tensor]:
    """`per_target_grads` for scores that each read one row of `root.x` (distinct rows): one
    backward of their sum through the head gives every score's gradient at its own row; the
    batched backward (`chunk` scores at a time) then starts from `root.x` with those rows as
    seeds, so nothing vocabulary-sized and no per-score indexing is batched."""
    x, x_rows = root.x, root.rows.to(root.x.device)
    (g_x,) = torch.autograd.grad(explained.sum(), [x], retain_graph=True)
    unfolds = unfolds or [None] * len(recorded)
    out: list[list[torch.Tensor]] = [[] for _ in recorded]
    n = explained.shape[0]
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(start + chunk, n), device=x.device)
        seeds = x.new_zeros(len(idx), *x.shape)
        seeds[torch.arange(len(idx)), 0, x_rows[idx]] = g_x[0, x_rows[idx]]
        grads = torch.autograd.grad(
            x,
            recorded,
            grad_outputs=seeds,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        for i, (g, r) in enumerate(zip(grads, rows, strict=True)):
            g = unfolds[i](g) if unfolds[i] is not None else g
            out[i].append(g[torch.arange(len(idx)), r[idx].to(g.device)])
    return [torch.cat(parts) for parts in out]


def per_target_grads(
    explained: torch.Tensor,
    recorded: list[torch.Tensor],
    rows: list[torch.Tensor],
    chunk: int,
    create_graph: bool = False,
    unfolds: list[Unfold | None] | None = None,
) -> list[torch.Tensor]:
    """For each explained score b, the gradient of that score alone w.r.t. row `rows[i][b]` of
    each recorded tensor i. When every score owns its own rows, one backward of the sum gives all
    of them; shared rows (an image encoded once for many phrases, one decoder pass for many
    tokens) take a batched backward (`is_grads_batched`) seeded with the k-th score of every
    image at once (scores of different images never share rows), `chunk` seeds at a time, or
    with `create_graph` one backward per score (vmap has no double backward for every op). A recorded
    tensor with an unfold (grouped cross-attention: the query rows of each pair in its image's
    block) is differentiated as the model computed it, and its gradients unfolded to pair rows,
    which each score owns."""
    n = explained.shape[0]
    unfolds = unfolds or [None] * len(recorded)

    def unfold(i: int, g: torch.Tensor) -> torch.Tensor:
        return unfolds[i](g) if unfolds[i] is not None else g

    owned = [
        u is not None or (t.shape[0] == n and torch.equal(r.cpu(), torch.arange(n)))
        for t, r, u in zip(recorded, rows, unfolds, strict=True)
    ]
    if all(owned):
        grads = torch.autograd.grad(
            explained.sum(),
            recorded,
            allow_unused=True,
            materialize_grads=True,
            create_graph=create_graph,
        )
        return [unfold(i, g) for i, g in enumerate(grads)]
    out: list[list[torch.Tensor]] = [[] for _ in recorded]
    if create_graph:
        for b in range(n):
            grads = torch.autograd.grad(
                explained[b],
                recorded,
                retain_graph=True,
                create_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for i, (g, r) in enumerate(zip(grads, rows, strict=True)):
                out[i].append(unfold(i, g)[r[b]][None])
        return [torch.cat(parts) for parts in out]
    # One seed per slot: the k-th score of every image at once (scores of different images
    # read disjoint rows of every recorded tensor, as independent samples of a batch do), so
    # the batched backward runs as many times as the most scores any image has.
    shared = [r.cpu() for r, mine in zip(rows, owned, strict=True) if not mine]
    same = all(torch.equal(r, shared[0]) for r in shared)
    slot = slots(shared[0]) if same else torch.arange(n)
    size = int(slot.max()) + 1
    order = []
    for start in range(0, size, chunk):
        members = torch.nonzero((slot >= start) & (slot < start + chunk))[:, 0]
        seed_of = (slot[members] - start).to(explained.device)
        members = members.to(explained.device)
        seeds = torch.zeros(
            min(chunk, size - start), n, dtype=explained.dtype, device=explained.device
        )
        seeds[seed_of, members] = 1
        grads = torch.autograd.grad(
            explained,
            recorded,
            grad_outputs=seeds,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        for i, (g, r) in enumerate(zip(grads, rows, strict=True)):
            g = unfold(i, g)
            out[i].append(g[seed_of.to(g.device), r.to(g.device)[members.to(g.device)]])
        order.append(members)
    back = torch.argsort(torch.cat(order))  # rows back in score order
    return [torch.cat(parts)[back.to(parts[0].device)] for parts in out]


def slots(image_index: torch.Tensor) -> torch.Tensor:
    """Per score, its rank among the scores of the same image (CPU)."""
    index = image_index.detach().long().cpu()
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(index)
    slot[order] = torch.arange(len(index)) - starts[index[order]]
    return slot


def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of `t`; no copy when they are all its rows in order, a view when they are all
    the same row."""
    rows = rows.to(t.device)
    if len(rows) == t.shape[0] and torch.equal(rows, torch.arange(len(rows), device=t.device)):
        return t
    if len(rows) and bool((rows == rows[0]).all()):
        return t[rows[0] : rows[0] + 1].expand(len(rows), *t.shape[1:])
    return t.index_select(0, rows)


def check_differentiable(method: Method, model: torch.nn.Module) -> None:
    """Differentiable maps need a gradient method and parameters that require grad."""
    if not method.needs_grad:
        raise InputError(
            f"method {method.name!r} has no gradient to differentiate: differentiable maps "
            "need attn-gradcam, gradcam or relevance"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise InputError(
            "differentiable=True: no parameter of the model requires grad, so the maps have "
            "nothing to train"
        )
