"""Split attention for prefix-shared rows: the first part causal, only the second part under an explicit mask.

A shared row (sharing.share_rows) is [first row: T slots | second row after the common prefix: L - T slots]. With
the whole [L, L] mask, sdpa computes every query against every key (an explicit mask skips no block). When the
first row is right-padded, its real tokens see exactly the tokens before them, which is plain causal attention over
the first T slots; only the second part needs the mask. This attention implementation (registered with
transformers' AttentionInterface as PREFIX_ATTENTION) reads a 4D mask that has fewer query rows than the row has
positions, [.., L - T, L], as that split: the first T queries run causal over the first T keys (sdpa's causal
kernel skips the blocks above the diagonal), the last L - T queries run under the mask over all L keys. Attention
work goes from L^2 to about T^2 / 2 + (L - T) L, and the mask from [L, L] to [L - T, L]. Any other call (no mask,
or a mask with a row per query) is transformers' sdpa unchanged, so a model switched to it behaves as under sdpa
everywhere else; the switch is not saved with the model (transformers leaves the attention implementation out of
config.json).

The first part's padding queries see the padding before them too (under the full mask they see only real tokens):
their hidden states differ, so the split serves readers of real positions only (`sharing.shared_scores`: a
classifier's pooled token).
"""

import torch

#: the attention implementation name (sdpa plus the split above)
PREFIX_ATTENTION = "alignkit_prefix_sdpa"


def prefix_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, heads, L, d], key / value [B, kv heads, L, d]; returns
    ([B, L, heads, d], None). A mask [B, 1, Q, L] with Q < L is the split layout (module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)
    length = query.shape[2]
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-2] >= length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise ValueError("the split prefix attention has no sliding window or softcap (enable_prefix_attention "
                         "refuses such models)")
    first = length - attention_mask.shape[-2]
    head, _ = sdpa_attention_forward(module, query[:, :, :first], key[:, :, :first], value[:, :, :first], None,
                                     dropout=dropout, scaling=scaling, is_causal=True, **kwargs)
    tail, _ = sdpa_attention_forward(module, query[:, :, first:], key, value, attention_mask, dropout=dropout,
                                     scaling=scaling, is_causal=False, **kwargs)
    return torch.cat([head, tail], dim=1), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PREFIX_ATTENTION, prefix_attention_forward)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)  # masks it builds itself: sdpa's


def full_attention_only(config) -> bool:
    """No layer of this (text) config attends through a sliding window or soft-caps its attention logits."""
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


def enable_prefix_attention(model: torch.nn.Module) -> bool:
    """Switch `model` (a transformers model, unwrapped) from sdpa to PREFIX_ATTENTION where it can take it: a model
    built on transformers' attention interface, every layer full attention. True when it now runs PREFIX_ATTENTION."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == PREFIX_ATTENTION:
        return True
    if current != "sdpa" or not full_attention_only(config.get_text_config()) \
            or not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    _register()
    model.set_attn_implementation(PREFIX_ATTENTION)
    return model.config._attn_implementation == PREFIX_ATTENTION
