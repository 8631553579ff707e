"""``GrowMemForCausalLM``: growmem's :class:`~growmem.models.CausalLM` (or a Recurrent Memory Transformer
around one) as a Hugging Face ``PreTrainedModel``.

The wrapped model is ``self.model``: what :func:`growmem.models.build_model` makes of the config, a plain
growmem ``CausalLM``, or a :class:`~growmem.models.RecurrentMemoryTransformer` when ``ModelConfig.rmt``
is set. The parameter names are growmem's under the prefix ``model.`` (``model.embed.weight``,
``model.layers.0.mixer.q_proj.weight``, ...; for an RMT ``model.backbone.embed.weight``, ...,
``model.memory``). With tied embeddings the LM head's weight is the embedding's and is saved once.

Decoding uses each mixer's own cache: :class:`GrowMemCache` wraps growmem's per-layer cache list and
the number of tokens it has seen (:class:`GrowMemRMTCache`: an RMT's streaming state, see
:meth:`RecurrentMemoryTransformer.feed`); ``prepare_inputs_for_generation`` feeds ``generate()`` only the
tokens the cache has not seen. Mixers whose plan depends on the total length (logarithmic Memory
Caching, ``loglinear++``) get it from ``generate``'s ``max_new_tokens`` / ``max_length``.

Limits (each raises a clear error): ``attention_mask`` must be all ones (no padding: growmem mixers
have no masking), no ``inputs_embeds``, no beam search, no ``output_attentions``; for an RMT, no
``output_hidden_states`` together with a cache.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from growmem.caching.wrapper import CachedMemory
from growmem.hf.configuration import GrowMemConfig
from growmem.layers.rope import RotaryEmbedding
from growmem.models.lm import IGNORE_INDEX, CausalLM
from growmem.models.rmt import RecurrentMemoryTransformer, RMTState, build_model

try:  # transformers >= 5 maps target -> source; 4.x lists the target names
    from transformers import __version__ as _TF_VERSION

    _TF_MAJOR = int(_TF_VERSION.split(".")[0])
except (ImportError, ValueError):  # pragma: no cover
    _TF_MAJOR = 5



def _tied_names(rmt: bool) -> tuple[str, str]:
    """(LM head weight, embedding weight): the full parameter names of the tied pair."""
    base = "model.backbone." if rmt else "model."
    return f"{base}lm_head.weight", f"{base}embed.weight"


def _tied_keys(rmt: bool) -> Any:
    """``_tied_weights_keys`` in the form the installed transformers wants (5.x: target -> source)."""
    head, embed = _tied_names(rmt)
    return {head: embed} if _TF_MAJOR >= 5 else [head]


_TIED: Any = _tied_keys(False)


class GrowMemCache:
    """growmem's decoding state for the HF API: the per-layer cache list and the tokens seen so far.

    ``layers`` is exactly what :meth:`growmem.models.CausalLM.forward` takes as ``cache``. Caches are
    functional: every forward returns a new ``GrowMemCache`` and leaves the one passed in untouched.
    """

    is_compileable = False

    def __init__(self, layers: list[Any], seen_tokens: int = 0) -> None:
        self.layers = layers
        self.seen_tokens = int(seen_tokens)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int | None:
        return None

    def get_max_length(self) -> int | None:  # transformers 4.x name
        return None

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"GrowMemCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("growmem models do not support beam search (num_beams > 1)")


class GrowMemRMTCache(GrowMemCache):
    """A Recurrent Memory Transformer's decoding state for the HF API: the :class:`RMTState` of
    :meth:`RecurrentMemoryTransformer.feed` (memory read by the open segment, that segment's backbone
    caches, tokens in it, segments opened) and the tokens seen so far. Functional, as
    :class:`GrowMemCache`: every forward returns a new one.

    ``layers`` is the open segment's per-layer backbone cache list (empty before the first token).
    """

    def __init__(self, state: RMTState, seen_tokens: int = 0, num_layers: int = 0) -> None:
        super().__init__(list(state.caches) if state.caches is not None else [], seen_tokens)
        self.state = state
        self.num_layers = int(num_layers)

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        st = self.state
        return (f"GrowMemRMTCache(seen_tokens={self.seen_tokens}, segments={st.segments}, "
                f"filled={st.filled})")


def _needs_total_length(model: CausalLM) -> bool:
    """Whether some mixer's streaming plan depends on the total length (logarithmic Memory Caching)."""
    return any(isinstance(m, CachedMemory) and m.config.segmentation == "log" for m in model.modules())


class GrowMemPreTrainedModel(PreTrainedModel):
    config_class = GrowMemConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_cache_class = False  # transformers 4.x: no DynamicCache
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """growmem's modules initialize themselves in their constructors: keep that. Only the RoPE
        frequency buffer (non-persistent, so not in the weights file) is recomputed here, since
        transformers builds the model on the meta device before loading the weights."""
        if isinstance(module, RotaryEmbedding):
            _reset_rope(module)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # transformers >= 4.4x: we make our own cache
        return False


def _reset_rope(module: RotaryEmbedding) -> None:
    exponent = torch.arange(0, module.head_dim, 2, dtype=torch.float64) / module.head_dim
    value = (module.base ** -exponent).to(torch.float32)
    if module.inv_freq.device.type == "meta":
        module.inv_freq = value.to(device="cpu")
    else:
        module.inv_freq.copy_(value.to(module.inv_freq.device))


class GrowMemForCausalLM(GrowMemPreTrainedModel, GenerationMixin):
    """growmem's causal LM with the Hugging Face interface (``forward``, ``generate``, ``save_pretrained``,
    ``from_pretrained``, ``AutoModelForCausalLM``). With ``ModelConfig.rmt`` set it wraps a Recurrent
    Memory Transformer (whose backbone is the causal LM the rest of the config describes).

    ``forward(input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=None,
    return_dict=None)`` returns :class:`CausalLMOutputWithPast`. ``labels`` follow the HF convention
    (same shape as ``input_ids``, shifted inside: position t predicts ``labels[:, t + 1]``; -100 ignored).
    """

    _tied_weights_keys = _TIED

    def __init__(self, config: GrowMemConfig) -> None:
        super().__init__(config)
        mc = config.to_model_config()
        self.is_rmt = getattr(mc, "rmt", None) is not None
        self._tied_weights_keys = _tied_keys(self.is_rmt)  # read by post_init / save_pretrained
        self.model: CausalLM | RecurrentMemoryTransformer = build_model(mc)
        self._gm_total_length: int | None = None
        self.post_init()

    @property
    def lm(self) -> CausalLM:
        """The growmem :class:`CausalLM` that holds the embeddings and the LM head: ``self.model``, or an
        RMT's backbone."""
        return self.model.backbone if isinstance(self.model, RecurrentMemoryTransformer) else self.model

    # -- embeddings (used by transformers' tying / resizing helpers) ---------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.lm.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm.lm_head = value

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("resizing the vocabulary of a growmem model is not supported")

    @property
    def growmem_model(self) -> CausalLM | RecurrentMemoryTransformer:
        """The wrapped growmem model (shares the parameters): a :class:`CausalLM`, or a
        :class:`RecurrentMemoryTransformer` when the config sets ``rmt``."""
        return self.model

    # -- caches -------------------------------------------------------------------------------------------
    @property
    def needs_total_length(self) -> bool:
        """True when a mixer's decoding plan depends on the total length (``loglinear++``, MC with
        ``segmentation='log'``): decoding caches must then be made with :meth:`new_cache`. Never for an
        RMT (each segment has a known length, and the RMT plans its backbone caches itself)."""
        return not self.is_rmt and _needs_total_length(self.model)

    def new_cache(self, batch_size: int, total_length: int | None = None) -> GrowMemCache:
        """An empty decoding cache for ``batch_size`` streams of at most ``total_length`` tokens (for an RMT:
        a :class:`GrowMemRMTCache` at the learned initial memory; ``total_length`` is checked against
        ``rmt.max_segments``)."""
        if isinstance(self.model, RecurrentMemoryTransformer):
            if total_length is not None:
                self._check_rmt_length(total_length)
            return GrowMemRMTCache(self.model.new_state(batch_size), 0, len(self.lm.layers))
        if total_length is None and self.needs_total_length:
            raise ValueError(_TOTAL_LENGTH_MSG)
        return GrowMemCache(self.model.new_cache(batch_size, total_length), 0)

    def _check_rmt_length(self, total_length: int) -> None:
        """Refuse a stream of ``total_length`` tokens that needs more than ``rmt.max_segments`` segments."""
        rmt = self.model
        assert isinstance(rmt, RecurrentMemoryTransformer)
        cap, n = rmt.rmt.max_segments, rmt.num_segments(total_length)
        if cap is not None and n > cap:
            raise ValueError(f"{total_length} tokens make {n} segments of {rmt.rmt.segment_len}, more than "
                             f"rmt.max_segments={cap}")

    def _check_cache(self, past_key_values: Any) -> None:
        """``past_key_values`` must be this model's kind of growmem cache."""
        want = GrowMemRMTCache if self.is_rmt else GrowMemCache
        if not isinstance(past_key_values, want) or (not self.is_rmt and isinstance(past_key_values, GrowMemRMTCache)):
            raise TypeError(f"past_key_values must be a {want.__name__} (from a previous forward or model.new_cache) "
                            f"for this growmem model, got {type(past_key_values).__name__}")

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, past_key_values: GrowMemCache | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None,
                inputs_embeds: torch.Tensor | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, **kwargs: Any) -> CausalLMOutputWithPast | tuple:
        if inputs_embeds is not None:
            raise ValueError("GrowMemForCausalLM takes input_ids only (inputs_embeds is not supported)")
        if input_ids is None:
            raise ValueError("GrowMemForCausalLM.forward needs input_ids [B, T]")
        if output_attentions:
            raise ValueError("growmem mixers have no attention maps to output (output_attentions=True)")
        num_items = kwargs.pop("num_items_in_batch", None)
        for ignored in ("position_ids", "cache_position", "token_type_ids", "logits_to_keep"):
            kwargs.pop(ignored, None)  # positions are implied by the cache
        extra = sorted(k for k, v in kwargs.items() if v is not None)
        if extra:
            raise TypeError(f"GrowMemForCausalLM.forward got unsupported arguments {extra}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if past_key_values is not None:
            self._check_cache(past_key_values)
        seen = 0 if past_key_values is None else past_key_values.get_seq_length()
        _check_attention_mask(attention_mask, input_ids, seen)
        if use_cache is None:
            use_cache = past_key_values is not None
        hidden: tuple[torch.Tensor, ...] | None = None
        new_cache: GrowMemCache | None
        if isinstance(self.model, RecurrentMemoryTransformer):
            logits, new_cache, hidden = self._rmt_forward(input_ids, past_key_values, bool(use_cache),
                                                          bool(output_hidden_states))
        else:
            if use_cache and past_key_values is None and self.needs_total_length:
                raise ValueError(_TOTAL_LENGTH_MSG)
            cache = past_key_values.layers if past_key_values is not None else None
            if output_hidden_states:
                logits, new_layers, hidden = self._forward_with_hidden(input_ids, cache, use_cache)
            else:
                out = self.model(input_ids, cache=cache, use_cache=use_cache)
                logits, new_layers = out.logits, out.cache
            new_cache = GrowMemCache(new_layers, seen + input_ids.shape[1]) if use_cache else None
        loss = _shifted_loss(logits, labels, self.config.vocab_size, num_items) if labels is not None else None
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if not return_dict:
            res = tuple(x for x in (logits, new_cache, hidden) if x is not None)
            return (loss, *res) if loss is not None else res
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=new_cache, hidden_states=hidden)

    def _rmt_forward(self, input_ids: torch.Tensor, past: GrowMemCache | None, use_cache: bool,
                     output_hidden_states: bool) -> tuple[torch.Tensor, GrowMemCache | None,
                                                          tuple[torch.Tensor, ...] | None]:
        """The RMT: without a cache its segment-wise ``forward`` (exactly growmem's logits and hidden
        states); with one (``past_key_values`` given or ``use_cache``) its streaming ``feed`` from that
        state (or from a fresh one)."""
        rmt = self.model
        assert isinstance(rmt, RecurrentMemoryTransformer)
        if past is None and not use_cache:
            out = rmt(input_ids, output_hidden_states=output_hidden_states)
            hidden = None
            if out.hidden_states is not None:  # as the plain path: the last entry after the final norm
                hidden = (*out.hidden_states[:-1], rmt.backbone.norm(out.hidden_states[-1]))
            return out.logits, None, hidden
        if output_hidden_states:
            raise ValueError("output_hidden_states with a cache (past_key_values or use_cache=True) is not "
                             "supported for Recurrent Memory Transformer models: call forward without a cache")
        if past is None:
            seen, state = 0, rmt.new_state(input_ids.shape[0])
        else:
            assert isinstance(past, GrowMemRMTCache)  # checked by forward
            seen, state = past.get_seq_length(), past.state
        logits, state = rmt.feed(input_ids, state)
        new = GrowMemRMTCache(state, seen + input_ids.shape[1], len(rmt.backbone.layers)) if use_cache else None
        return logits, new, None

    def _forward_with_hidden(self, input_ids, cache, use_cache):
        m = self.model
        m.check_ids(input_ids)
        if cache is not None and len(cache) != len(m.layers):
            raise ValueError(f"cache has {len(cache)} layers, model has {len(m.layers)}")
        x = m.embed(input_ids.long())
        hidden = [x]
        new_cache = []
        for i, layer in enumerate(m.layers):
            x, c = layer(x, cache[i] if cache is not None else None, use_cache)
            new_cache.append(c)
            hidden.append(x)
        x = m.norm(x)
        hidden[-1] = x
        return m.lm_head(x), (new_cache if use_cache else None), tuple(hidden)

    # -- generation ------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: GrowMemCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        """Feed the model only the tokens its cache has not seen; make the cache on the first step
        (with the total length ``generate`` plans, so that logarithmic Memory Caching works)."""
        if inputs_embeds is not None:
            raise ValueError("generate() with inputs_embeds is not supported by growmem models")
        if use_cache:
            if past_key_values is None:
                past_key_values = self.new_cache(input_ids.shape[0], self._gm_total_length)
            else:
                self._check_cache(past_key_values)
            input_ids = input_ids[:, past_key_values.get_seq_length():]
        else:
            past_key_values = None
        return {"input_ids": input_ids.contiguous(), "past_key_values": past_key_values,
                "attention_mask": attention_mask, "use_cache": use_cache}

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any) -> Any:
        """``transformers`` generation (greedy, sampling, ...) with growmem's caches. Beam search is not
        supported. The total length (prompt + new tokens) is given to mixers whose plan needs it; for an
        RMT it is checked against ``rmt.max_segments`` before decoding."""
        gc = generation_config if generation_config is not None else self.generation_config
        if int(kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1) > 1:
            raise NotImplementedError("growmem models do not support beam search (num_beams > 1)")
        total = _planned_length(inputs, gc, kwargs)
        if self.is_rmt and total is not None:
            self._check_rmt_length(total)
        prev = self._gm_total_length
        self._gm_total_length = total
        try:
            return super().generate(inputs, generation_config=generation_config, **kwargs)
        finally:
            self._gm_total_length = prev

    def _reorder_cache(self, past_key_values: Any, beam_idx: torch.Tensor) -> Any:  # transformers 4.x
        raise NotImplementedError("growmem models do not support beam search (num_beams > 1)")

    # -- loading with growmem's checks -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """``PreTrainedModel.from_pretrained`` with strict checks: missing, unexpected or mis-shaped weights
        (e.g. a ``config.json`` edited after saving), a missing or unreadable weights file raise ``ValueError``
        (transformers itself only warns about missing weights and initializes them at random)."""
        want_info = kwargs.pop("output_loading_info", False)
        where = str(pretrained_model_name_or_path)
        folder = os.path.join(where, kwargs["subfolder"]) if kwargs.get("subfolder") else where
        if os.path.isdir(folder):
            config = kwargs.get("config")
            if not isinstance(config, GrowMemConfig):
                try:
                    config = GrowMemConfig.from_pretrained(folder)
                except (OSError, ValueError, TypeError) as err:
                    raise ValueError(f"cannot read a growmem config from {where!r}: {err}") from None
            check_weights_folder(folder, config)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except Exception as err:
            msg = str(err)
            if "mismatch" in msg.lower():
                raise ValueError(f"the weights in {where!r} do not fit the model its config.json describes "
                                 f"(was config.json edited?): {_short(msg)}") from err
            if type(err).__name__ == "SafetensorError" or "deserializ" in msg.lower():
                raise ValueError(f"corrupted or unreadable weights file in {where!r}: {_short(msg)}") from err
            raise
        tied = {_tied_names(model.is_rmt)[0]} if model.config.tie_word_embeddings else set()
        missing = sorted(set(info.get("missing_keys", [])) - tied)
        unexpected = sorted(info.get("unexpected_keys", []))
        mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])]
        errors = list(info.get("error_msgs", []))
        if (missing or unexpected or mismatched or errors) and os.path.isdir(folder):
            # the header check passed, so transformers renamed keys on the way (4.x turns "beta"/"gamma" in
            # any name into "bias"/"weight"): load the tensors under their saved names instead
            _load_local_weights(model, folder)
        elif missing or unexpected or mismatched or errors:
            raise ValueError(f"the weights in {where!r} do not fit the model its config.json describes (was "
                             f"config.json edited, or are the weights from another model?): missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, mis-shaped {sorted(mismatched)[:5]}"
                             + (f", errors {errors[:2]}" if errors else ""))
        for m in model.modules():  # the non-persistent RoPE buffers are not in the weights file
            if isinstance(m, RotaryEmbedding):
                _reset_rope(m)
        lm = model.lm
        if model.config.tie_word_embeddings and lm.lm_head.weight is not lm.embed.weight:
            lm.lm_head.weight = lm.embed.weight
        return (model, info) if want_info else model


def _weight_files(folder: str) -> list[str]:
    import json

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"corrupted weights index {index!r}: {err}") from None
        return sorted({os.path.join(folder, f) for f in weight_map.values()})
    raise ValueError(f"no model.safetensors (or model.safetensors.index.json) in {folder!r}")


def _load_local_weights(model: GrowMemForCausalLM, folder: str) -> None:
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        sd.update(load_file(f))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(_tied_names(model.is_rmt)) if model.config.tie_word_embeddings else set()
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise ValueError(f"the weights in {folder!r} do not fit the model its config.json describes: missing "
                         f"{missing[:5]}, unexpected {sorted(unexpected)[:5]}")


def check_weights_folder(folder: str | os.PathLike, config: GrowMemConfig) -> None:
    """Check a saved folder's safetensors weights against the model ``config`` describes, reading the
    headers only: raises ``ValueError`` naming the missing / unexpected / mis-shaped tensors, or the file
    that is missing or unreadable. (A corrupted tensor payload is not detectable: safetensors has no
    checksums.)"""
    from safetensors import SafetensorError, safe_open

    folder = str(folder)
    files = _weight_files(folder)
    found: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open is not iterable
                    found[k] = tuple(fh.get_slice(k).get_shape())
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(f"corrupted or unreadable weights file {f!r}: {err}") from None
    mc = config.to_model_config()
    with torch.device("meta"):
        ref = build_model(mc)
    want = {f"model.{k}": tuple(v.shape) for k, v in ref.state_dict().items()}
    is_rmt = getattr(mc, "rmt", None) is not None
    head, embed = _tied_names(is_rmt)
    optional = {head, embed} if config.tie_word_embeddings else set()
    missing = sorted(k for k in want if k not in found and k not in optional)
    if optional and not (optional & found.keys()):
        missing.append(embed)
    unexpected = sorted(k for k in found if k not in want)
    mis = sorted(f"{k}: file {found[k]} vs model {want[k]}" for k in want if k in found and found[k] != want[k])
    if missing or unexpected or mis:
        rmt_file = any(k.startswith("model.backbone.") for k in found)
        hint = ""
        if rmt_file != is_rmt:
            hint = (" the file holds a Recurrent Memory Transformer's weights (model.backbone.*) but config.json "
                    "sets no growmem['rmt'];" if rmt_file else
                    " the file holds a plain CausalLM's weights but config.json sets growmem['rmt'] (a Recurrent "
                    "Memory Transformer);")
        raise ValueError(f"the weights in {folder!r} do not fit the model its config.json describes (was config.json "
                         f"edited, or are the weights from another model?):{hint} "
                         + "; ".join(f"{what} {items[:5]}" + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
                                     for what, items in (("missing", missing), ("unexpected", unexpected),
                                                         ("mis-shaped", mis)) if items))


_TOTAL_LENGTH_MSG = ("this growmem model has a mixer whose decoding plan depends on the total length (logarithmic "
                     "Memory Caching, e.g. 'loglinear++'): make the cache with model.new_cache(batch_size, "
                     "total_length) and pass it as past_key_values, or use generate() with max_new_tokens / max_length")


def _short(msg: str, n: int = 400) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= n else msg[:n] + " ..."


def _check_attention_mask(mask: torch.Tensor | None, input_ids: torch.Tensor, seen: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != input_ids.shape[0] \
            or mask.shape[1] not in (input_ids.shape[1], seen + input_ids.shape[1]):
        raise ValueError(f"attention_mask must be [B, T] (or [B, past + T]) with all ones, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if not bool((mask == 1).all()):
        raise ValueError("growmem models support only an all-ones attention_mask (no padding): their recurrent "
                         "mixers cannot skip tokens. Run sequences of different lengths separately, or right-pad "
                         "and ignore the padded positions' outputs (causal: earlier positions are unaffected)")


def _shifted_loss(logits: torch.Tensor, labels: torch.Tensor, vocab: int, num_items: Any) -> torch.Tensor:
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have the shape of input_ids {tuple(logits.shape[:2])}, "
                         f"got {tuple(labels.shape)}")
    t = labels.long()
    bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= vocab))
    if bool(bad.any()):
        raise ValueError("labels must be in [0, vocab_size) or -100")
    targets = F.pad(t[:, 1:], (0, 1), value=IGNORE_INDEX)
    lf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if num_items is not None:
        total = F.cross_entropy(lf.reshape(-1, lf.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="sum")
        return total / (num_items.to(total.device) if isinstance(num_items, torch.Tensor) else num_items)
    return F.cross_entropy(lf.reshape(-1, lf.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def _planned_length(inputs: Any, gc: Any, kwargs: dict[str, Any]) -> int | None:
    """prompt + new tokens, as ``generate`` will resolve it (max_new_tokens wins over max_length)."""
    ids = inputs if isinstance(inputs, torch.Tensor) else kwargs.get("input_ids")
    prompt = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.dim() >= 1 else None
    max_new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
    if max_new is not None and prompt is not None:
        return prompt + int(max_new)
    max_len = kwargs.get("max_length", getattr(gc, "max_length", None))
    if max_len is None:
        return None
    return max(int(max_len), prompt or 1)
