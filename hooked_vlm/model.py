"""``HookedVLM``: a LLaVA-family decoder as a TransformerLens ``HookedTransformer`` with an image prefix."""

from __future__ import annotations

import contextlib
import numbers
import os
import warnings
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice, sample_logits
from transformers import PreTrainedModel

from hooked_vlm import architectures, checkpoint, families
from hooked_vlm.conversion.transformer_lens import load_decoder_weights_, quiet_deprecation, tl_config
from hooked_vlm.errors import (
    CheckpointNotFoundError,
    CheckpointWarning,
    DeviceDtypeError,
    HookedVLMWarning,
    LoadOptionError,
    PromptError,
)
from hooked_vlm.imagememo import DEFAULT_MAX_IMAGES, ImageMemo
from hooked_vlm.inputs import VLMInputs
from hooked_vlm.preparation import first_token_id, prepare_inputs, tokenizer_fingerprint


def _check_device_dtype(device: str, dtype: torch.dtype) -> None:
    """:class:`DeviceDtypeError` unless ``device`` names an available device that can run ``dtype``."""
    if not dtype.is_floating_point:
        raise DeviceDtypeError(f"dtype must be a floating type, got {dtype}.")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise DeviceDtypeError(f"device={device!r} is not a device torch knows ('cpu', 'cuda:1', ...).") from err
    if dev.type == "meta":
        raise DeviceDtypeError("device='meta' holds no weights; use a real device such as 'cpu' or 'cuda'.")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceDtypeError(f"device={device!r} was requested but CUDA is not available; use device='cpu'.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceDtypeError(f"device={device!r} was requested but MPS is not available; use device='cpu'.")
    if dev.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceDtypeError("This GPU cannot run bfloat16; use dtype=torch.float16 or torch.float32.")
    try:
        a = torch.ones(2, 2, dtype=dtype, device=dev)
        torch.nn.functional.silu(a @ a).softmax(-1)
    except (RuntimeError, TypeError, AssertionError, ValueError) as err:
        raise DeviceDtypeError(f"{dtype} cannot run on {device!r}: {err}") from err


class HookedVLM(HookedTransformer):
    """A LLaVA-family vision-language model whose decoder is a TransformerLens ``HookedTransformer``.

    The image tower and projector run as transformers modules (``model.image_adapter``) and
    feed projected image tokens into the residual stream at the image placeholder positions.
    Extra hook points:

    - ``hook_image_features`` ``[n_crops, n_patches, d_vision]``: what the projector reads
      (LLaVA-NeXT: base image and tiles of every image, in order).
    - ``hook_image_embeds`` ``[batch, n_image_tokens, d_model]``: the projected tokens as they
      enter the decoder, per example in sequence order (anyres newline tokens included);
      zero-padded to the longest example in a batch.
    - ``hook_embed`` ``[batch, pos, d_model]`` fires on the merged sequence (text and image
      embeddings), so it equals ``blocks.0.hook_resid_pre``.

    InstructBLIP (see :mod:`hooked_vlm.qformer`): ``hook_image_features`` is the Q-Former's query output
    ``[n_images, n_queries, d_qformer]`` that ``language_projection`` reads, ``hook_image_embeds`` the
    projected prefix, and ``hook_qformer_queries`` ``[n_images, n_queries, d_qformer]`` the learned query
    embeddings as they enter the Q-Former.

    Build it with :meth:`from_pretrained`, feed it :meth:`prepare` outputs.
    """

    def __init__(self, cfg, processor, image_adapter: torch.nn.Module, family: str, hf_config):
        with quiet_deprecation():
            super().__init__(cfg, tokenizer=None, move_to_device=False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.cfg.tokenizer_prepends_bos = len(self.tokenizer.encode("")) > 0
        # Like TransformerLens for Llama models: strings start with BOS (as prepare(template=None) does).
        self.cfg.default_prepend_bos = self.tokenizer.bos_token_id is not None
        self.family = family
        self.hf_config = hf_config
        self.image_adapter = image_adapter
        self.image_token_id = int(hf_config.image_token_id)
        self._image_memo: ImageMemo | None = None  # set inside reuse_images()
        # The final RMSNorm weight, kept when fold_ln folds it into W_U (for lenses without the norm).
        self.register_buffer("final_norm_weight", torch.ones(cfg.d_model, dtype=cfg.dtype), persistent=False)
        self.hook_image_features = HookPoint()
        self.hook_image_embeds = HookPoint()
        for name in families.get(family).hooks:
            setattr(self, name, HookPoint())
        self.setup()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        name_or_path: str | os.PathLike,
        *,
        hf_model: PreTrainedModel | None = None,
        processor=None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        fold_ln: bool = True,
        center_unembed: bool = True,
        n_ctx: int | None = None,
        progress: bool = True,
        **hf_kwargs,
    ) -> HookedVLM:
        """Load a checkpoint and convert its decoder.

        Args:
            name_or_path: a hub name, a local checkpoint directory, or a name from
                ``hooked_vlm.zoo`` such as ``"shapes-llava"``. The family is read from the config.
            hf_model, processor: an in-memory transformers model and processor to convert instead
                (TransformerLens's ``hf_model=`` convention); ``hf_model`` is left untouched and its
                vision tower and projector are shared, not copied. From disk, the decoder is read
                tensor by tensor from the safetensors files, so it is never held twice.
            dtype: weights' dtype: a floating ``torch.dtype`` or one of the strings ``"float32"``
                (``"fp32"``, ``"float"``), ``"float16"`` (``"fp16"``, ``"half"``), ``"bfloat16"``
                (``"bf16"``), ``"float64"`` (``"fp64"``, ``"double"``), also with a ``"torch."`` prefix,
                or ``"auto"``: the checkpoint's own (``hf_model``'s dtype, else config.json's
                ``dtype``, else the stored embedding's). Default: float32.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ... (default: cuda if available).
            fold_ln, center_unembed: TransformerLens weight processing (log-probs are unchanged).
            n_ctx: the longest sequence allowed, >= 1 (default: the decoder's max_position_embeddings;
                a larger value warns, since RoPE beyond the trained length is extrapolation).
            progress: show a progress bar while the decoder layers are converted.
            hf_kwargs: only these are accepted: ``revision``, ``cache_dir``, ``token``,
                ``local_files_only`` (fetching a hub checkpoint, or its processor with ``hf_model=``),
                ``trust_remote_code`` (default False; passed to transformers' ``AutoConfig``,
                ``AutoProcessor`` and model loading, which never prompt; an unsupported ``model_type``
                is refused before transformers runs, whatever its value) and ``attn_implementation``
                (the vision tower's attention; from disk only).

        Every file is checked: decoder tensors' names and shapes against the config (also for
        ``hf_model``), transformers' report on the vision tower and projector, shard paths of a
        ``model.safetensors.index.json``. NaN or inf weights warn (:class:`CheckpointWarning`) naming
        the tensors; so does ``n_ctx`` above max_position_embeddings (:class:`HookedVLMWarning`).

        Raises:
            CheckpointNotFoundError: nothing to load: an empty name, a name neither local nor on the
                hub, a directory without ``config.json`` / ``model.safetensors`` / a tokenizer file / an
                image-processor config, or an index naming a shard file that is not there.
            CheckpointError: a damaged or inconsistent checkpoint: invalid JSON, an unreadable or truncated
                safetensors file, an index pointing outside the directory, decoder or vision / projector
                tensors missing, unexpected, of the wrong shape or not floating point (the message lists them).
            UnsupportedModelError: the architecture is not a supported LLaVA family (checked on
                config.json before transformers runs any of the checkpoint's code), or only
                ``.bin`` weights.
            DeviceDtypeError: an unknown ``dtype`` or ``device``, or ``dtype`` cannot run on ``device``.
            LoadOptionError: an unknown ``hf_kwargs`` key, or ``n_ctx`` that is not an integer >= 1.
        """
        try:
            from hooked_vlm import zoo
        except ImportError:  # the zoo is optional in a source checkout
            zoo = None
        checkpoint.check_hf_kwargs(hf_kwargs, in_memory=hf_model is not None)
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, numbers.Integral) or n_ctx < 1):
            raise LoadOptionError(f"n_ctx must be an integer >= 1 (or None for the decoder's own), got {n_ctx!r}.")
        trust = hf_kwargs.get("trust_remote_code", False)
        hub = {k: v for k, v in hf_kwargs.items() if k in checkpoint.HUB_KWARGS}
        requested = checkpoint.parse_dtype(dtype)
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if requested != "auto":
            _check_device_dtype(device, requested)
        source = str(name_or_path)
        if zoo is not None and source in zoo.available():
            source = str(zoo.path(source))
        if hf_model is None:
            directory = checkpoint.resolve(source, **hub)
            raw = checkpoint.read_config(directory)
            architectures.check_raw_config(raw, str(directory / "config.json"))  # before transformers runs code
            tensors = checkpoint.DecoderTensors(directory)
            dtype = checkpoint.auto_dtype(raw, tensors) if requested == "auto" else requested
            if requested == "auto":
                _check_device_dtype(device, dtype)
            config = checkpoint.load_config(directory, trust_remote_code=trust)
            spec = architectures.spec_for(config)
            tensors.check(config)
            if processor is None:
                processor = checkpoint.load_processor(directory, trust_remote_code=trust)
            extra = {k: hf_kwargs[k] for k in ("attn_implementation",) if k in hf_kwargs}
            vlm = checkpoint.load_without_decoder(spec.model_class, directory, config, dtype, trust_remote_code=trust,
                                                  **extra)
            get = tensors
        else:
            config = hf_model.config
            spec = architectures.spec_for(config)
            dtype = checkpoint.auto_dtype({}, hf_model=hf_model) if requested == "auto" else requested
            if requested == "auto":
                _check_device_dtype(device, dtype)
            decoder_module, lm_head = spec.decoder(hf_model)
            decoder = dict(decoder_module.named_parameters())
            decoder["lm_head.weight"] = lm_head.weight
            checkpoint.check_decoder({n: (n, tuple(p.shape), p.dtype) for n, p in decoder.items()}, config, "hf_model")
            if processor is None:
                if not source.strip():
                    raise CheckpointNotFoundError("An empty name gives no processor to load; pass processor=.")
                processor = checkpoint.load_processor(source, trust_remote_code=trust, **hub)
            vlm = hf_model.eval()
            get = lambda name, index=None: decoder[name] if index is None else decoder[name][index]  # noqa: E731
        max_pos = config.text_config.max_position_embeddings
        if n_ctx is not None and n_ctx > max_pos:
            warnings.warn(f"n_ctx={n_ctx} exceeds the decoder's max_position_embeddings={max_pos}: RoPE beyond the "
                          "trained length is extrapolation.", HookedVLMWarning, stacklevel=2)
        bad_outside = checkpoint.non_finite_outside_decoder(vlm)
        get = checked = checkpoint.FiniteCheck(get)
        cfg = tl_config(config.text_config, dtype=dtype, device=device, fold_ln=fold_ln, n_ctx=n_ctx)
        adapter = spec.make_adapter(spec.core(vlm))
        with torch.device(device):
            model = cls(cfg, processor, adapter, spec.family, config)
        if checkpoint.tied(config):
            untied = get
            get = lambda name, index=None: untied(  # noqa: E731
                "embed_tokens.weight" if name == "lm_head.weight" else name, index
            )
        with tqdm(total=cfg.n_layers, desc="converting decoder", unit="layer", disable=not progress,
                  leave=False) as bar:
            load_decoder_weights_(model, get, fold_ln=fold_ln, center_unembed=center_unembed,
                                  layer_done=lambda _: bar.update())
        if bad_outside or checked.bad:
            names = ", ".join(bad_outside + [f"decoder {name}" for name in checked.bad])
            warnings.warn(f"NaN or inf weights in {source!r}: {names}; activations computed from them are not "
                          "finite.", CheckpointWarning, stacklevel=2)
        model.image_adapter.to(device=device, dtype=dtype)
        model.cfg.model_name = source
        return model.eval()

    # ------------------------------------------------------------------ inputs
    def prepare(
        self,
        text: str | Sequence[str],
        image=None,
        *,
        template: str | None = "auto",
        vqa_suffix: bool = False,
    ) -> VLMInputs:
        """Tokenise prompts with their images into :class:`VLMInputs`.

        Args:
            text: a question (or a list of them, giving a left-padded batch). With a template the question
                may not contain special tokens (``</s>``, ``<pad>``, ``<image>``, chat control tokens): they
                would become control tokens mid-prompt. With ``template=None`` the text is the whole prompt,
                tokenised as written, special tokens included (``<image>`` where each image goes, ``</s>``
                between turns, Llama-3 headers); only a leading BOS is refused, as the tokenizer adds it.
            image: a PIL image, a list of them (one per prompt, or a list per prompt), or None.
                Non-RGB images (RGBA, L, P, ...) are converted with ``Image.convert("RGB")``.
            template: InstructBLIP: ``"auto"`` (the instruction as is, as transformers/LAVIS prompt
                InstructBLIP-Vicuna; it also goes to the Q-Former, so it shapes the image tokens) or None.
                LLaVA: ``"auto"`` (vicuna_v1 for LLaVA-1.5 / v1.6-Vicuna, the checkpoint's Llama-3
                chat template for Llama3-LLaVA-NeXT), ``"vicuna_v1"``, ``"llama3"``, ``"chat"`` (the
                processor's chat template without a system prompt) or None.
            vqa_suffix: append the short-answer instruction "Answer the question using a single word or
                phrase." of "Cross-modal Information Flow in Multimodal Large Language Models" (Zhang et al.).

        Raises:
            PromptError: placeholders and images do not match, the prompt is empty or longer than n_ctx, or
                the question contains a special token.
            ImageError: an image is not a PIL image or uint8 array.
        """
        return prepare_inputs(self, text, image, template=template, vqa_suffix=vqa_suffix)

    def check_inputs(self, inputs: VLMInputs) -> VLMInputs:
        """``inputs`` if they can run on this model, else :class:`PromptError` naming the problem.

        Checks the tokenizer fingerprint (inputs prepared by another model), image placeholders without
        pixels, and the length against ``n_ctx``.
        """
        if not isinstance(inputs, VLMInputs):
            raise PromptError(f"Expected VLMInputs from model.prepare(...), got {type(inputs).__name__}.")
        theirs = inputs.tokenizer_fingerprint
        if theirs is not None:
            mine = tokenizer_fingerprint(self)
            if theirs != mine:
                raise PromptError(
                    f"These inputs were prepared by {theirs} and cannot run on this model, {mine}: "
                    "their token ids and image tokens belong to another tokenizer. Prepare them with this model."
                )
        if inputs.pixel_values is None:
            n = int((inputs.input_ids == self.image_token_id).sum())
            if n:
                raise PromptError(
                    f"The inputs have {n} image placeholder tokens ({self.image_token_id}) but no pixel_values: "
                    "the placeholders would run as their own embedding. Prepare them with model.prepare(text, image)."
                )
        if inputs.seq_len > self.cfg.n_ctx:
            raise PromptError(f"The input has {inputs.seq_len} positions, more than n_ctx={self.cfg.n_ctx}.")
        return inputs

    def _as_inputs(self, inputs) -> VLMInputs:
        if isinstance(inputs, str):
            return self.prepare(inputs, None, template=None)
        return self.check_inputs(inputs)

    def _check_tokens(self, tokens: torch.Tensor, *, offset: int = 0, n_new: int = 0) -> None:
        """Refuse token tensors (or embeddings) that are too long, or token ids with image placeholders."""
        if tokens.dim() not in (2, 3):
            raise PromptError(
                f"Token tensors are [batch, pos] (embeddings [batch, pos, d_model]); got {tokens.dim()}-D."
            )
        if tokens.shape[1] == 0 and offset == 0:
            raise PromptError("The input has no tokens (an empty string or a [batch, 0] tensor).")
        n = offset + tokens.shape[1] + n_new
        if n > self.cfg.n_ctx:
            parts = [f"{tokens.shape[1]} input positions"]
            parts += [f"{offset} cached positions"] if offset else []
            parts += [f"max_new_tokens={n_new}"] if n_new else []
            total = f"{' + '.join(parts)} = {n} positions" if len(parts) > 1 else f"{n} positions"
            raise PromptError(f"The input has {total}, more than n_ctx={self.cfg.n_ctx}.")
        if tokens.dim() == 2 and offset == 0 and not tokens.is_floating_point():
            n_image = int((tokens == self.image_token_id).sum())
            if n_image:
                raise PromptError(
                    f"The tokens contain {n_image} image placeholder ids ({self.image_token_id}) but no pixels: "
                    "they would run as the placeholder's own embedding. Run the VLMInputs from model.prepare(text, "
                    "image) instead (for transformer_lens.head_detector.detect_head(model, inputs, ...) pass "
                    "cache=model.run_with_cache(inputs, remove_batch_dim=True)[1])."
                )

    # ------------------------------------------------------------------ embedding
    @contextlib.contextmanager
    def reuse_images(self, max_images: int = DEFAULT_MAX_IMAGES) -> Iterator[ImageMemo]:
        """Within the ``with`` block, the vision tower runs once per distinct image, not once per forward.

        A study runs several forwards per image (a ``generate`` for the correctness filter, then the analysis;
        five paraphrased instructions; knockout batches). Inside ``with model.reuse_images():`` the image tokens
        of each image are memoised, keyed by its pixel content (a hash of its ``pixel_values`` row, anyres: its
        own crops, and its ``image_sizes`` row), so a later forward on the same pixels reuses them, bit-identical.
        A batch runs only its images that are not memoised yet. InstructBLIP memoises the vision tower's output
        per image and its prefix tokens per (image, Q-Former instruction ids): a new instruction on a seen
        image runs only the Q-Former.

        The memo is bypassed (everything runs as outside the block) while a hook is attached to
        ``hook_image_features`` or the family's vision hooks (``hook_qformer_queries``), or a backward hook to
        ``hook_image_embeds``, and while autograd would record the image adapter (grad mode on and its
        parameters requiring grad): hooks see and edit exactly what they do outside. ``hook_image_embeds``
        forward hooks still fire on every forward, on a fresh tensor (editing it never reaches the memo).
        PyTorch hooks put directly on the vision tower's modules fire only when an image is computed.
        The memo assumes the adapter's weights do not change inside the block. Blocks nest (the inner one
        reuses the outer memo).

        Args:
            max_images: entries kept per kind, least recently used dropped first. Memory: one entry holds an
                image's tokens, ``n_image_tokens * d_model`` elements in the model's dtype: LLaVA-1.5-7B 576 x 4096
                (4.5 MiB in float16), LLaVA-v1.6 anyres up to 2,928 x 4096 (23 MiB); InstructBLIP adds the vision
                output, 257 x 1408 (0.7 MiB), per image. The default 16 thus costs at most ~72 MiB (LLaVA-1.5),
                ~370 MiB (LLaVA-v1.6 at 672 px), on the model's device.

        Yields:
            the :class:`~hooked_vlm.imagememo.ImageMemo` (``hits``, ``misses``, ``nbytes``).

        Raises:
            LoadOptionError: ``max_images`` is not a positive integer.
        """
        outer = getattr(self, "_image_memo", None)
        memo = outer if outer is not None else ImageMemo(max_images)
        self._image_memo = memo
        try:
            yield memo
        finally:
            self._image_memo = outer

    def _active_image_memo(self) -> ImageMemo | None:
        """The memo of an enclosing :meth:`reuse_images`, unless a hook or autograd needs the fresh run."""
        memo = getattr(self, "_image_memo", None)
        if memo is None:
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.image_adapter.parameters()):
            return None
        for name in ("hook_image_features", *families.get(self.family).hooks):
            point = getattr(self, name)
            if point._forward_hooks or point._forward_pre_hooks or point._backward_hooks:
                return None
        if self.hook_image_embeds._backward_hooks:
            return None
        return memo

    def image_embeds(self, inputs: VLMInputs) -> list[Float[torch.Tensor, "n_image_tokens d_model"]]:
        """Projected image tokens of each example (concatenated over its images), hooks applied (memoised per
        image inside :meth:`reuse_images`)."""
        memo = self._active_image_memo()
        if memo is None:
            per_image = self.image_adapter.from_inputs(self, inputs)
        else:
            per_image = self.image_adapter.from_inputs(self, inputs, memo=memo)
        counts = [len(lays) for lays in inputs.layouts]
        per_example, i = [], 0
        for n in counts:
            chunk = per_image[i : i + n]
            i += n
            per_example.append(torch.cat(chunk, 0) if chunk else per_image[0].new_zeros(0, self.cfg.d_model))
        longest = max(t.shape[0] for t in per_example)
        padded = torch.stack([torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[0])) for t in per_example])
        padded = self.hook_image_embeds(padded)
        return [padded[b, : per_example[b].shape[0]] for b in range(len(per_example))]

    def embed_inputs(
        self, inputs: VLMInputs, tokens: Int[torch.Tensor, "batch pos"] | None = None
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """The decoder's input embeddings: token embeddings with image tokens scattered in.

        ``tokens`` (default ``inputs.input_ids``) embed the text positions; their image placeholders must be
        where ``inputs.input_ids`` has them (:class:`PromptError` otherwise), since those come from the pixels.
        """
        self.check_inputs(inputs)
        given = inputs.input_ids.to(self.cfg.device)
        if tokens is None:
            tokens = given
        else:
            tokens = tokens.to(self.cfg.device)
            if tokens.shape != given.shape:
                raise PromptError(f"hook_tokens returned tokens of shape {tuple(tokens.shape)} for inputs of shape "
                                  f"{tuple(given.shape)}; a hook may change token ids, not the shape.")
            moved = (tokens == self.image_token_id) != (given == self.image_token_id)
            if moved.any():
                b, pos = (int(x) for x in torch.nonzero(moved)[0])
                raise PromptError(
                    f"hook_tokens changed example {b} position {pos} from {int(given[b, pos])} to "
                    f"{int(tokens[b, pos])}: image placeholders ({self.image_token_id}) come from the pixels, so a "
                    "hook may edit text tokens only (use hook_embed or hook_image_embeds to edit image tokens)."
                )
        embed = self.embed(tokens)
        if inputs.pixel_values is not None:
            image_mask = tokens == self.image_token_id
            for b, emb in enumerate(self.image_embeds(inputs)):
                if emb.shape[0] != int(image_mask[b].sum()):
                    raise PromptError(
                        f"Example {b} has {int(image_mask[b].sum())} image placeholder tokens but its images "
                        f"give {emb.shape[0]} tokens; build inputs with model.prepare()."
                    )
                embed[b, image_mask[b]] = emb.to(embed.dtype)
        return embed

    def input_to_embed(self, input, prepend_bos=None, padding_side=None, attention_mask=None, past_kv_cache=None):
        if not isinstance(input, VLMInputs):
            if isinstance(input, (str, list)):
                if any(isinstance(t, str) and not t for t in ([input] if isinstance(input, str) else input)):
                    raise PromptError("The input has no tokens (an empty string); give some text.")
                # TransformerLens would cut long text at n_ctx; tokenise in full and refuse instead.
                input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side, truncate=False)
            if isinstance(input, torch.Tensor):
                tokens = input[None] if input.dim() == 1 else input
                offset = 0 if past_kv_cache is None else self.get_pos_offset(past_kv_cache, tokens.shape[0])
                self._check_tokens(tokens, offset=offset)
                if self.cfg.use_hook_tokens and not input.is_floating_point():
                    input = input.clone()  # an in-place hook_tokens edit must not reach the caller's tensor
            return super().input_to_embed(input, prepend_bos, padding_side, attention_mask, past_kv_cache)
        self.check_inputs(input)
        tokens = input.input_ids.to(self.cfg.device).clone()
        mask = None
        if input.has_padding or past_kv_cache is not None:
            mask = input.attention_mask.to(self.cfg.device)
            if past_kv_cache is not None:
                mask = past_kv_cache.append_attention_mask(mask)
        if self.cfg.use_hook_tokens:
            tokens = self.hook_tokens(tokens)
        embed = self.hook_embed(self.embed_inputs(input, tokens if self.cfg.use_hook_tokens else None))
        return embed, tokens, None, mask

    # ------------------------------------------------------------------ running
    def forward(self, input, *args, inputs: VLMInputs | None = None, **kwargs):
        """``HookedTransformer.forward``; VLMInputs run with their images.

        To resume from a cached residual, pass the inputs it came from:
        ``model(cache["resid_pre", l], start_at_layer=l, inputs=inputs)`` takes their attention mask (padding
        and the RoPE positions of a left-padded batch) and, for ``return_type="loss"``, their tokens.
        ``return_type="loss"`` on VLMInputs counts only text targets (see :meth:`loss_fn`).

        Raises:
            PromptError: VLMInputs with ``start_at_layer`` (it takes a residual tensor), ``inputs=`` without
                ``start_at_layer`` or of another batch / length than the residual.
        """
        start = kwargs.get("start_at_layer")
        if isinstance(input, VLMInputs) and start is not None:
            raise PromptError("start_at_layer takes a residual-stream tensor, not VLMInputs; pass the inputs as "
                              "inputs=: model(resid, start_at_layer=l, inputs=inputs).")
        if inputs is not None:
            if start is None:
                raise PromptError("inputs= is for resuming with start_at_layer; pass VLMInputs as the first argument.")
            self.check_inputs(inputs)
            if not isinstance(input, torch.Tensor) or input.dim() != 3 or input.shape[:2] != inputs.shape:
                got = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
                raise PromptError(f"The residual {got} does not match the inputs' [batch, pos] = "
                                  f"{tuple(inputs.shape)}; pass the inputs the residual was cached from.")
            if kwargs.get("attention_mask") is None:
                kwargs["attention_mask"] = inputs.attention_mask.to(self.cfg.device)
            if kwargs.get("tokens") is None:
                kwargs["tokens"] = inputs.input_ids.to(self.cfg.device)
        return super().forward(input, *args, **kwargs)

    def loss_fn(self, logits, tokens, attention_mask=None, per_token: bool = False):
        """Next-token cross-entropy whose targets are text tokens only.

        The prediction of position ``t + 1`` from ``t`` counts when ``t + 1`` is a text token (not an image
        placeholder, not padding) and ``t`` is not padding; the last image token predicting the first text token
        after the image counts. Per token: ``[batch, pos - 1]`` with 0 where not counted. Without image tokens
        this is TransformerLens's loss.
        """
        tokens = tokens.to(logits.device)
        image = tokens == self.image_token_id
        if not image.any():
            return super().loss_fn(logits, tokens, attention_mask, per_token)
        real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        real = real.to(logits.device)
        counted = real[:, :-1] & real[:, 1:] & ~image[:, 1:]
        log_probs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        log_probs = log_probs.masked_fill(~counted, 0.0).to(logits.dtype)
        if per_token:
            return -log_probs
        return -log_probs.sum() / counted.sum().clamp(min=1)

    def get_caching_hooks(self, names_filter=None, incl_bwd=False, device=None, remove_batch_dim=False, cache=None,
                          pos_slice=None):
        """TransformerLens's caching hooks, except that ``pos_slice`` slices position axes only.

        ``hook_image_features``, ``hook_image_embeds`` and the family's vision hooks (``hook_qformer_queries``)
        index crops, patches or image tokens, not positions: they are cached whole. TransformerLens would slice
        the head axis of ``hook_rot_q`` / ``hook_rot_k`` (and of the per-head inputs ``hook_q_input``,
        ``hook_k_input``, ``hook_v_input``, ``hook_attn_in``) and the batch axis of ``hook_tokens``; here their
        position axis is sliced.
        """
        cache, fwd, bwd = super().get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache,
                                                    pos_slice)
        pos_slice = Slice.unwrap(pos_slice)
        if pos_slice.mode == "identity":
            return cache, fwd, bwd
        whole = {"hook_image_features", "hook_image_embeds", *families.get(self.family).hooks}
        pos_dims = {"hook_tokens": -1, **{n: -3 for n in _PER_HEAD_POS_HOOKS}}

        def pos_dim(name: str) -> int | None:
            return pos_dims.get(name.rsplit(".", 1)[-1])

        def save(tensor, hook, is_backward=False):
            kept = tensor.detach().to(device)
            if remove_batch_dim:
                kept = kept[0]
            dim = pos_dim(hook.name)
            if dim is not None and kept.dim() >= -dim:
                kept = pos_slice.apply(kept, dim=dim)
            cache[hook.name + ("_grad" if is_backward else "")] = kept

        def ours(name: str) -> bool:
            return name in whole or pos_dim(name) is not None

        fwd = [(n, partial(save, is_backward=False) if ours(n) else f) for n, f in fwd]
        bwd = [(n, partial(save, is_backward=True) if ours(n) else f) for n, f in bwd]
        return cache, fwd, bwd

    def to_tokens(self, input, *args, **kwargs):
        """``HookedTransformer.to_tokens``; strings start with the tokenizer's BOS by default (``prepend_bos=True``
        when the tokenizer has one, as TransformerLens does for Llama models). VLMInputs give their
        ``input_ids`` ``[batch, pos]`` (image placeholders included), e.g. for
        ``transformer_lens.head_detector.detect_head`` with ``cache=`` (see docs/transformer-lens.md)."""
        if isinstance(input, VLMInputs):
            return self.check_inputs(input).input_ids.to(self.cfg.device)
        return super().to_tokens(input, *args, **kwargs)

    def to_str_tokens(self, input, *args, **kwargs):
        """One label per position: tokenizer spelling for text, ``<img r3 c17>``-style for image tokens.

        InstructBLIP's query tokens are ``<query 0>`` ... ``<query N-1>``.
        Anyres images label base-image patches ``<img base r.. c..>``, high-resolution grid patches
        ``<img tile r.. c..>`` and row ends ``<img newline r..>``. Padding is ``<pad>``-spelled.
        For a batch, ``example=`` picks one (default 0). Other inputs behave as in TransformerLens.
        """
        if not isinstance(input, VLMInputs):
            return super().to_str_tokens(input, *args, **kwargs)
        example = kwargs.pop("example", 0)
        ids = input.input_ids[example].tolist()
        labels = iter(input.image_labels(example))
        out = []
        for tok_id in ids:
            if tok_id == self.image_token_id:
                out.append(next(labels))
            else:
                out.append(self.tokenizer.convert_ids_to_tokens(tok_id))
        return out

    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        input="",
        max_new_tokens: int = 10,
        *,
        stop_at_eos: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str | None = None,
        verbose: bool = False,
        **generation_kwargs,
    ):
        """Autoregressive decoding; greedy by default (like transformers' ``generate``), for every input type.

        ``VLMInputs`` decode with a KV cache (``use_past_kv_cache=False`` gives the same tokens) and return
        the new tokens ``[batch, n_new]`` (``return_type="tokens"``, the default), prompt and new tokens
        (``"input"``, as TransformerLens does for token inputs) or the decoded new text per example (``"str"``).
        ``output_logits=True`` returns, as TransformerLens does, a ``GenerateDecoderOnlyOutput`` with
        ``sequences`` (prompt and new tokens ``[batch, pos + n_new]``) and ``logits`` (one ``[batch, d_vocab]``
        per new token); ``return_dict_in_generate`` is accepted and ignored, as in TransformerLens.
        Strings, token tensors and embeddings go to TransformerLens's ``generate`` with every argument
        (``return_type`` default ``"input"``). :meth:`generate_stream` yields the same tokens in chunks.

        Raises:
            PromptError: the prompt and ``max_new_tokens`` do not fit in ``n_ctx``; token ids with image
                placeholders but no pixels; a bad argument value.
            TypeError: an unknown keyword argument.
        """
        allowed = {"output_logits", "return_dict_in_generate"}
        unknown = sorted(set(generation_kwargs) - allowed)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}.")
        _check_generate_args(max_new_tokens, do_sample, stop_at_eos, temperature, top_k, top_p, return_type,
                             isinstance(input, VLMInputs))
        if not isinstance(input, VLMInputs):
            return self._generate_tl(input, max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                                     do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature,
                                     freq_penalty=freq_penalty, use_past_kv_cache=use_past_kv_cache,
                                     prepend_bos=prepend_bos, padding_side=padding_side,
                                     return_type=return_type or "input", verbose=verbose, **generation_kwargs)
        output_logits = bool(generation_kwargs.get("output_logits", False))
        inputs = self._check_vlm_generate(input, max_new_tokens, prepend_bos, padding_side)
        prompt = inputs.input_ids.to(self.cfg.device)
        new_tokens, step_logits = [], []
        for nxt, logits in self._decode(inputs, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
                                        temperature, freq_penalty, use_past_kv_cache, verbose):
            new_tokens.append(nxt)
            step_logits.append(logits)
        out = torch.stack(new_tokens, 1) if new_tokens else prompt.new_zeros(prompt.shape[0], 0)
        if output_logits:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=torch.cat([prompt, out], 1), logits=tuple(step_logits))
        if return_type == "str":
            return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
        if return_type == "input":
            return torch.cat([prompt, out], 1)
        return out

    def _check_vlm_generate(self, input: VLMInputs, max_new_tokens: int, prepend_bos, padding_side) -> VLMInputs:
        for name, value in (("prepend_bos", prepend_bos), ("padding_side", padding_side)):
            if value is not None:
                raise PromptError(f"{name} applies to string inputs; VLMInputs are already tokenised.")
        inputs = self.check_inputs(input)
        if inputs.seq_len + max_new_tokens > self.cfg.n_ctx:
            raise PromptError(
                f"The prompt has {inputs.seq_len} positions; with max_new_tokens={max_new_tokens} that makes "
                f"{inputs.seq_len + max_new_tokens}, more than n_ctx={self.cfg.n_ctx}."
            )
        return inputs

    def _decode(self, inputs: VLMInputs, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
                temperature, freq_penalty, use_past_kv_cache, verbose
                ) -> Iterator[tuple[Int[torch.Tensor, " batch"], Float[torch.Tensor, "batch d_vocab"]]]:
        """Yield ``(next token, the logits it was chosen from)`` per step (finished rows get the pad token)."""
        batch = inputs.batch_size
        if eos_token_id is None:
            eos_token_id = self.tokenizer.eos_token_id
        stop = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if stop_at_eos and not stop:
            raise PromptError("stop_at_eos=True needs eos_token_id: the tokenizer has no EOS token.")
        pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else (stop or [0])[0]
        cache = TransformerLensKeyValueCache.init_cache(self.cfg, self.cfg.device, batch)
        logits = self(inputs, past_kv_cache=cache)[:, -1].clone()  # a view would keep [batch, pos, vocab] alive
        finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
        prompt = inputs.input_ids.to(logits.device)
        new_tokens: list[torch.Tensor] = []
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generating"):
            if do_sample:
                seen = torch.cat([prompt, *[t[:, None] for t in new_tokens]], 1)
                nxt = sample_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature,
                                    freq_penalty=freq_penalty, tokens=seen)
            else:
                nxt = logits.argmax(-1)
            if stop_at_eos:
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                finished |= torch.isin(nxt, torch.tensor(stop, device=nxt.device))
            new_tokens.append(nxt)
            yield nxt, logits
            if (stop_at_eos and finished.all()) or step == max_new_tokens - 1:
                break
            ones = torch.ones(batch, 1, dtype=torch.long, device=logits.device)
            logits = super().forward(nxt[:, None], past_kv_cache=cache, attention_mask=ones)[:, -1]

    @torch.no_grad()
    def generate_stream(  # type: ignore[override]
        self,
        input="",
        max_new_tokens: int = 10,
        max_tokens_per_yield: int = 25,
        stop_at_eos: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str | None = "input",
        verbose: bool = False,
    ) -> Iterator[Int[torch.Tensor, "batch n"]]:
        """Stream tokens as TransformerLens's ``generate_stream`` does; greedy by default.

        Yields token chunks ``[batch, n]``: the first is the prompt's ``input_ids`` with the first new token(s),
        later ones only new tokens, each yield holding at most ``max_tokens_per_yield`` new ones (the first
        chunk is yielded as soon as it reaches ``max_tokens_per_yield`` positions, as in TransformerLens).
        Concatenated they equal ``generate(inputs, ..., return_type="input")``. Strings and token tensors go to
        TransformerLens's ``generate_stream``.

        Raises:
            PromptError: as :meth:`generate`; ``max_tokens_per_yield`` below 1.
        """
        _check_generate_args(max_new_tokens, do_sample, stop_at_eos, temperature, top_k, top_p, None,
                             isinstance(input, VLMInputs))
        if isinstance(max_tokens_per_yield, bool) or not isinstance(max_tokens_per_yield, numbers.Integral) \
                or max_tokens_per_yield < 1:
            raise PromptError(f"max_tokens_per_yield must be a positive integer, got {max_tokens_per_yield!r}.")
        if not isinstance(input, VLMInputs):
            if isinstance(input, str):
                tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side, truncate=False)
            elif isinstance(input, torch.Tensor):
                tokens = input
            else:
                raise PromptError(f"generate_stream takes VLMInputs, a string or a token tensor; got "
                                  f"{type(input).__name__}.")
            self._check_tokens(tokens, n_new=max_new_tokens)
            yield from super().generate_stream(
                input, max_new_tokens=max_new_tokens, max_tokens_per_yield=max_tokens_per_yield,
                stop_at_eos=stop_at_eos, eos_token_id=eos_token_id, do_sample=do_sample, top_k=top_k, top_p=top_p,
                temperature=temperature, freq_penalty=freq_penalty, use_past_kv_cache=use_past_kv_cache,
                prepend_bos=prepend_bos, padding_side=padding_side, return_type=return_type, verbose=verbose)
            return
        inputs = self._check_vlm_generate(input, max_new_tokens, prepend_bos, padding_side)
        pending = inputs.input_ids.to(self.cfg.device)
        for nxt, _ in self._decode(inputs, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
                                   temperature, freq_penalty, use_past_kv_cache, verbose):
            pending = nxt[:, None] if pending is None else torch.cat([pending, nxt[:, None]], 1)
            if pending.shape[1] >= max_tokens_per_yield:
                yield pending
                pending = None
        if pending is not None:
            yield pending

    def _generate_tl(self, input, max_new_tokens: int, **kwargs):
        """TransformerLens's generate, after checking length and image placeholders on the full tokenisation."""
        if isinstance(input, (str, list)):
            if isinstance(input, list) and not all(isinstance(t, str) for t in input):
                raise PromptError("generate takes VLMInputs, a string, a list of strings or a token tensor.")
            if any(not t for t in ([input] if isinstance(input, str) else input)):
                raise PromptError("The input has no tokens (an empty string); give some text to continue.")
            side = "left" if isinstance(input, list) and len(input) > 1 else kwargs["padding_side"]
            tokens = self.to_tokens(input, prepend_bos=kwargs["prepend_bos"], padding_side=side, truncate=False)
        elif isinstance(input, torch.Tensor):
            tokens = input
        else:
            raise PromptError(f"generate takes VLMInputs, strings or a token tensor; got {type(input).__name__}.")
        self._check_tokens(tokens, n_new=max_new_tokens)
        return super().generate(input, max_new_tokens=max_new_tokens, **kwargs)

    def answer(self, inputs: VLMInputs, max_new_tokens: int = 5) -> list[str]:
        """Greedy answers, stripped and lowercased (the correctness check of "Cross-modal Information Flow in
        Multimodal Large Language Models" (Zhang et al.))."""
        return [a.strip().lower() for a in self.generate(inputs, max_new_tokens, return_type="str")]

    def token_id(self, word: str) -> Int[torch.Tensor, ""]:
        """The first token of ``word`` as it starts an answer (no BOS).

        Raises:
            PromptError: the word is empty or its first token is the tokenizer's unknown token (a word-level
                tokenizer without the word): its probability would be that of ``<unk>``.
        """
        return torch.tensor(first_token_id(self.tokenizer, word))


# [batch, pos, head, ...] hooks whose position axis is -3 (TransformerLens's pos_slice assumes -2 for them).
_PER_HEAD_POS_HOOKS = ("hook_rot_q", "hook_rot_k", "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in")
_RETURN_TYPES = ("tokens", "input", "str", "embeds")


def _check_generate_args(max_new_tokens, do_sample, stop_at_eos, temperature, top_k, top_p, return_type,
                         vlm: bool) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise PromptError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}.")
    if not vlm and max_new_tokens < 1:
        raise PromptError(f"max_new_tokens must be at least 1 for string and token inputs, got {max_new_tokens}.")
    for name, value in (("do_sample", do_sample), ("stop_at_eos", stop_at_eos)):
        if not isinstance(value, bool):
            raise PromptError(f"{name} must be True or False, got {value!r}.")
    if return_type is not None and return_type not in _RETURN_TYPES:
        raise PromptError(f"Unknown return_type {return_type!r}; choose one of {_RETURN_TYPES}.")
    if vlm and return_type == "embeds":
        raise PromptError("return_type='embeds' is for embedding inputs; VLMInputs return 'tokens', 'input' or 'str'.")
    if do_sample:
        if not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise PromptError(f"temperature must be positive when sampling, got {temperature!r}.")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
            raise PromptError(f"top_k must be a positive integer or None, got {top_k!r}.")
        if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
            raise PromptError(f"top_p must be in (0, 1] or None, got {top_p!r}.")
