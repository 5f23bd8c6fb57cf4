"""Row-sparse gradients for a large input embedding that is trained and not tied to an output head.

A batch reaches only the embedding rows of its tokens, yet the dense backward of `nn.Embedding` allocates and
zero-fills a `[vocab, hidden]` gradient every step (78 MB for a 151,936 x 128 embedding, 2 GB for Llama 3's
128,256 x 4,096 in float32): fresh pages each step, faulted in and filled. With `RowGrads` the embedding's backward
is sparse (`nn.Embedding.sparse`: the rows used and their gradients), and once the step's micro-batches are
accumulated `densify()` writes them into one persistent dense buffer, zeroing only the rows the last step wrote.
The optimizer, clipping and metrics then see an ordinary dense gradient with the same values (the sum over a
token's occurrences may be added in another order: equal up to float rounding), so every optimizer works unchanged.

Used only where it is safe and pays: one process (DDP's all-reduce and ZeRO want dense gradients), an
`nn.Embedding` whose weight requires a gradient, is not shared with any other module (a tied LM head's gradient
is dense anyway), and has at least MIN_ELEMENTS entries. `close()` puts the module's `sparse` flag back.
"""

import torch

from alignkit.blocks.sharing import without_wrappers

#: embeddings smaller than this many entries keep the dense backward (2**22: a 32,768 x 128 matrix)
MIN_ELEMENTS = 2**22


class RowGrads:
    """The persistent dense gradient of one embedding, filled from its sparse backward each step."""

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        self.embedding, self.was_sparse = embedding, embedding.sparse
        self.buffer: torch.Tensor | None = None
        # the rows the buffer holds non-zero values in; None with a buffer: any row may (a dense gradient was added)
        self.rows: torch.Tensor | None = None
        embedding.sparse = True

    @classmethod
    def maybe(cls, model: torch.nn.Module, num_processes: int) -> "RowGrads | None":
        """RowGrads for `model`'s input embedding where the module docstring's conditions hold, else None."""
        if num_processes != 1:
            return None
        inner = without_wrappers(model)
        get = getattr(inner, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if type(embedding) is not torch.nn.Embedding and not _plain_subclass(embedding):
            return None
        weight = embedding.weight
        if not weight.requires_grad or weight.numel() < MIN_ELEMENTS or embedding.max_norm is not None:
            return None
        if sum(p is weight for _, p in inner.named_parameters(remove_duplicate=False)) != 1:
            return None  # tied to a head (or registered twice)
        return cls(embedding)

    def densify(self) -> None:
        """The accumulated sparse gradient -> the dense buffer, set as the weight's gradient."""
        weight = self.embedding.weight
        grad = weight.grad
        if grad is None or not grad.is_sparse:
            if grad is not None and grad is self.buffer:  # zeroed in place and added to densely: rows unknown
                self.rows = None
            return
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        if self.buffer is None:
            self.buffer = torch.zeros_like(weight)
        elif self.rows is None:
            self.buffer.zero_()
        else:
            self.buffer.index_fill_(0, self.rows, 0)
        self.buffer.index_add_(0, rows, values.to(self.buffer.dtype))
        self.rows = rows
        weight.grad = self.buffer

    def close(self) -> None:
        self.embedding.sparse = self.was_sparse
        self.buffer = self.rows = None


def _plain_subclass(module) -> bool:
    """An nn.Embedding subclass that still looks its rows up with F.embedding and the module's `sparse` flag (e.g.
    a scaled word embedding that multiplies the result): its forward is the parent's, or calls it."""
    if not isinstance(module, torch.nn.Embedding):
        return False
    import inspect

    forward = type(module).forward
    if forward is torch.nn.Embedding.forward:
        return True
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "super().forward(" in source
