"""The lean loss path: cross-entropy over the trained positions only, in chunks, never the full logits.

With a 32k vocabulary the language-model head and its loss are most of a small model's training step:
the model's own loss builds ``[batch, length, 32064]`` logits, upcasts them to fp32, takes a
log-softmax and, in the backward pass, a second one plus a zero-filled gradient of the same size
(44% of a step measured on this CPU). Here the head projects only the positions whose next token is
trained (answer tokens, not prompt or padding), a chunk at a time, and computes the gradient of the
hidden states in the same pass (the fused linear cross-entropy of Liger Kernel, whose Triton kernels
need a GPU; this one is plain torch and runs everywhere). Only ``[positions, hidden]`` tensors
outlive a chunk.

The head's weight is frozen in LoRA training, so no gradient is computed for it; a trained or
LoRA-adapted head makes the forward fall back to the model's own loss.
"""

from __future__ import annotations

import functools
import types

import torch

CHUNK = 1024  # positions per chunk: [1024, 32064] fp32 is 131 MB, freed before the next one


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of cross_entropy(hidden @ weight.T, targets), with d(loss)/d(hidden) computed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mm_dtype: torch.dtype):
        w = weight.to(mm_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], CHUNK):
            h = hidden[start : start + CHUNK].to(mm_dtype)
            t = targets[start : start + CHUNK]
            logits = (h @ w.T).float()
            target = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(top).exp_()  # in place, one exp pass serves the loss and the gradient
            norm = e.sum(dim=-1)
            total += (top.squeeze(1) + norm.log() - target).sum()
            if grad_hidden is not None:
                # d/dlogits of (logsumexp - logit[t]) is softmax - onehot(t)
                probs = e.div_(norm[:, None])
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                grad_hidden[start : start + CHUNK] = (probs.to(mm_dtype) @ w).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T, targets[i]) for rows already selected; matmuls in the autocast dtype if on."""
    device = hidden.device.type
    mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, mm_dtype)


def supports_lean_loss(model) -> bool:
    """Plain causal LMs whose logits are ``lm_head(last_hidden_state)`` with no scaling, softcap or bias."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    plain = all(getattr(config, name, None) in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
    plain_head = head is not None and getattr(head, "bias", None) is None
    return plain and plain_head and hasattr(model, model.base_model_prefix)


def add_lean_loss(model) -> bool:
    """Give ``model`` the lean loss path: called with ``labels``, it returns the loss and no logits.

    The model's ``forward`` is replaced on the instance (before PEFT wraps it), so DDP, PEFT and the
    Trainer all go through it; called without labels (generation) it is the original forward. Returns
    False, changing nothing, for a model whose head is not a plain projection.
    """
    if not supports_lean_loss(model):
        return False
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward

    @functools.wraps(type(model).forward)  # keeps the signature the Trainer and generate() inspect
    def forward(self, *args, labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        if labels is None or type(head) is not torch.nn.Linear or head.weight.requires_grad:
            # generation; or a head that is trained or adapted (modules_to_save, LoRA on lm_head),
            # whose weight alone is not the projection: the model's own forward and loss
            if labels is not None:
                kwargs.update(labels=labels, num_items_in_batch=num_items_in_batch)
            return original(*args, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False
        out = getattr(self, self.base_model_prefix)(*args, **kwargs)
        hidden = out.last_hidden_state[:, :-1]
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != -100
        total = chunked_cross_entropy_sum(hidden[keep], head.weight, targets[keep])
        count = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        loss = total / torch.as_tensor(count, device=total.device)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=None, attentions=None)

    model.forward = types.MethodType(forward, model)
    return True
