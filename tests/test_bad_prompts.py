"""Bad prompts, answer words and position/layer selections: a named error or a SelectionWarning, never a number.

Every refusal is checked for its error type, a message naming the culprit, and a model left as it was (no hooks,
the same logits for a fixed input).
"""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import noise_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformer_lens import HookedTransformer

from hooked_vlm import HookedVLM, PromptError, SelectionWarning, VLMInputs
from hooked_vlm.analysis import (
    answer_probability,
    attention_knockout,
    contextualization,
    image_token_masking,
    image_token_truncation,
    knockout_flows,
    logit_lens,
    norm_attention,
    visual_verbalization,
)
from hooked_vlm.analysis.knockout import block_attention, knockout_hooks, window_layers
from hooked_vlm.datasets import shapes
from hooked_vlm.hooks import pattern_rows, record, zero_ablate

UNKNOWN_WORDS = ["zebra", "banana", "?!", "\u200bred"]  # not in shapes-llava's word-level vocabulary
SPECIALS = ["</s>", "<pad>", "<s>", "<unk>", "<image>"]


@pytest.fixture(scope="module")
def shapes_model():
    return HookedVLM.from_pretrained("shapes-llava", device="cpu", progress=False)


@pytest.fixture(scope="module")
def rec():
    return next(shapes.generate(1, seed=123_457))


@pytest.fixture(scope="module")
def sample(shapes_model, rec):
    """A fixed input and its logits, to check that a refusal leaves the model as it was."""
    inputs = shapes_model.prepare(rec.question, rec.image)
    with torch.no_grad():
        return inputs, shapes_model(inputs)


def no_hooks(model) -> bool:
    return all(not hp._forward_hooks and not hp.fwd_hooks for hp in model.hook_dict.values())


def assert_untouched(model, inputs, logits):
    assert no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(inputs), logits)


# ---------------------------------------------------------------------------------------------- 1, 6: <unk> words
@pytest.mark.parametrize("word", UNKNOWN_WORDS)
def test_token_id_refuses_unknown_words(shapes_model, sample, word):
    with pytest.raises(PromptError, match="does not know") as err:
        shapes_model.token_id(word)
    assert repr(word) in str(err.value) and "<unk>" in str(err.value)
    assert int(shapes_model.token_id("red")) == shapes_model.tokenizer.get_vocab()["red"]
    assert int(shapes_model.token_id("<unk>")) == shapes_model.tokenizer.unk_token_id  # asked for by name
    assert_untouched(shapes_model, *sample)


@pytest.mark.parametrize("word", UNKNOWN_WORDS)
def test_answer_probability_refuses_unknown_answer_and_false_option(shapes_model, sample, word):
    inputs, logits = sample
    with pytest.raises(PromptError, match="The answer") as err:
        answer_probability(shapes_model, inputs, word)
    assert repr(word) in str(err.value)
    with pytest.raises(PromptError, match="The false option") as err:
        answer_probability(shapes_model, inputs, "red", false_option=word)
    assert repr(word) in str(err.value)
    with pytest.warns(SelectionWarning, match="'Red' start with the same token"):
        answer_probability(shapes_model, inputs, "red", false_option="Red")
    assert_untouched(shapes_model, inputs, logits)


def test_logit_lens_prob_refuses_unknown_words(shapes_model, sample):
    inputs, logits = sample
    lens = logit_lens(shapes_model, inputs, positions=[-1])
    with pytest.raises(PromptError, match="'banana'"):
        lens.prob("banana")
    with pytest.raises(PromptError, match="whole numbers"):
        lens.prob(3.5)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        lens.prob(-1)
    red = lens.prob("red")
    assert set(red) == {"red", "Red"} and red["red"].shape == (shapes_model.cfg.n_layers + 1, 1)
    assert_untouched(shapes_model, inputs, logits)


@pytest.mark.parametrize("target", ["a zebra circle", "?!", "\u200bred"])
def test_truncation_refuses_unknown_target_words(shapes_model, sample, rec, target):
    inputs, logits = sample
    with pytest.raises(PromptError, match="does not know") as err:
        image_token_truncation(shapes_model, inputs, target, counts=[1, 2])
    assert any(repr(p) in str(err.value) for p in ("zebra", "?!", "\u200b"))
    with pytest.raises(PromptError, match="image placeholder"):
        image_token_truncation(shapes_model, inputs, "a red <image>", counts=[1])
    assert_untouched(shapes_model, inputs, logits)


# ---------------------------------------------------------------------------------------------- 2: special tokens
@pytest.mark.parametrize("special", SPECIALS)
def test_special_tokens_in_the_question_are_refused(shapes_model, sample, rec, special):
    with pytest.raises(PromptError) as err:
        shapes_model.prepare(f"what color {special} is the circle ?", rec.image)
    assert repr(special) in str(err.value)
    assert_untouched(shapes_model, *sample)


def test_llama3_control_tokens_are_refused(hooked):
    model = hooked("llama3_next")
    for special in ["<|eot_id|>", "<|start_header_id|>", "<|begin_of_text|>"]:
        with pytest.raises(PromptError, match="special token") as err:
            model.prepare(f"What color {special} is it ?", noise_image(60, 40))
        assert repr(special) in str(err.value)


def test_template_none_takes_special_tokens_as_written_but_not_a_second_bos(shapes_model, sample, rec):
    tok = shapes_model.tokenizer
    inputs = shapes_model.prepare("USER: <image>\nwhat color ? ASSISTANT: red</s>USER: and ? ASSISTANT:", rec.image,
                                  template=None)
    ids = inputs.input_ids[0].tolist()
    assert ids.count(tok.eos_token_id) == 1 and ids.count(tok.bos_token_id) == 1
    with pytest.raises(PromptError, match="'<s>'") as err:
        shapes_model.prepare("<s> USER: <image>\nwhat color ? ASSISTANT:", rec.image, template=None)
    assert "twice" in str(err.value)
    assert_untouched(shapes_model, *sample)


# ---------------------------------------------------------------------------------------------- 3: raw inputs
def test_long_string_into_forward_raises_instead_of_truncating(shapes_model, sample):
    n_ctx = shapes_model.cfg.n_ctx
    with pytest.raises(PromptError, match=f"n_ctx={n_ctx}") as err:
        shapes_model("red " * 1000)
    assert "1001" in str(err.value)  # 1000 words and BOS
    tokens = torch.full((1, n_ctx + 1), shapes_model.tokenizer.get_vocab()["red"])
    for run in (shapes_model, shapes_model.run_with_cache, lambda t: shapes_model.run_with_hooks(t, fwd_hooks=[])):
        with pytest.raises(PromptError, match=f"{n_ctx + 1} positions"):
            run(tokens)
    for empty in ("", torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(PromptError, match="no tokens"):
            shapes_model(empty)
        with pytest.raises(PromptError, match="no tokens"):
            shapes_model.generate(empty)
    assert shapes_model("red red").shape[1] == 3  # short strings still run (BOS and two words)
    assert_untouched(shapes_model, *sample)


def test_image_placeholders_without_pixels_are_refused(shapes_model, sample):
    inputs, logits = sample
    tokens = inputs.input_ids
    runs = {
        "forward": lambda: shapes_model(tokens),
        "run_with_cache": lambda: shapes_model.run_with_cache(tokens),
        "run_with_hooks": lambda: shapes_model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x)]),
        "generate": lambda: shapes_model.generate(tokens, max_new_tokens=2),
        "string": lambda: shapes_model("what <image> color"),
    }
    for name, run in runs.items():
        with pytest.raises(PromptError, match="image placeholder") as err:
            run()
        assert str(shapes_model.image_token_id) in str(err.value), name
    blind = replace(inputs, pixel_values=None)
    for run in (lambda: shapes_model(blind), lambda: shapes_model.generate(blind, 2),
                lambda: logit_lens(shapes_model, blind)):
        with pytest.raises(PromptError, match="no pixel_values"):
            run()
    assert shapes_model.to_str_tokens(tokens[0])  # labelling tokens is fine
    assert_untouched(shapes_model, inputs, logits)


# ---------------------------------------------------------------------------------------------- 4, 5: generate
def test_generate_past_n_ctx_raises_before_any_work(shapes_model, sample):
    inputs, logits = sample
    red = shapes_model.tokenizer.get_vocab()["red"]
    with pytest.raises(PromptError) as err:
        shapes_model.generate(torch.full((1, 250), red), max_new_tokens=20)
    assert all(str(n) in str(err.value) for n in (250, 20, 270, 256))
    with pytest.raises(PromptError) as err:
        shapes_model.generate(inputs, max_new_tokens=256 - inputs.seq_len + 1)
    assert str(inputs.seq_len) in str(err.value) and "n_ctx=256" in str(err.value)
    assert shapes_model.generate(inputs, max_new_tokens=256 - inputs.seq_len, stop_at_eos=True).shape[0] == 1
    assert_untouched(shapes_model, inputs, logits)


def test_generate_refuses_unknown_arguments_and_values(shapes_model, sample):
    inputs, logits = sample
    for inp in (inputs, "what color"):
        with pytest.raises(TypeError, match="max_tokens"):
            shapes_model.generate(inp, max_tokens=1)
        with pytest.raises(PromptError, match="'bogus'"):
            shapes_model.generate(inp, return_type="bogus")
        with pytest.raises(PromptError, match="temperature"):
            shapes_model.generate(inp, do_sample=True, temperature=0)
        with pytest.raises(PromptError, match="top_p"):
            shapes_model.generate(inp, do_sample=True, top_p=1.5)
        with pytest.raises(PromptError, match="max_new_tokens"):
            shapes_model.generate(inp, max_new_tokens=2.5)
    with pytest.raises(PromptError, match="prepend_bos"):
        shapes_model.generate(inputs, prepend_bos=True)
    assert_untouched(shapes_model, inputs, logits)


def test_every_generate_argument_reaches_transformer_lens(shapes_model, monkeypatch):
    seen = {}
    real = HookedTransformer.generate

    def spy(self, input, **kwargs):
        seen.update(kwargs)
        return real(self, input, **kwargs)

    monkeypatch.setattr(HookedTransformer, "generate", spy)
    args = dict(max_new_tokens=3, stop_at_eos=False, eos_token_id=5, do_sample=True, top_k=2, top_p=0.9,
                temperature=0.7, freq_penalty=0.5, use_past_kv_cache=False, prepend_bos=True, padding_side="left",
                return_type="tokens", verbose=False)
    shapes_model.generate("what color is the", **args)
    assert seen == args
    monkeypatch.undo()
    greedy = [shapes_model.generate("what color is the", max_new_tokens=4, do_sample=False, return_type="tokens")
              for _ in range(4)]
    assert all(isinstance(g, torch.Tensor) and torch.equal(g, greedy[0]) for g in greedy)
    tokens = shapes_model.to_tokens("what color is the")
    for _ in range(4):  # the same greedy continuation by hand
        nxt = shapes_model(tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], 1)
        if int(nxt) == shapes_model.tokenizer.eos_token_id:
            break
    assert torch.equal(greedy[0], tokens)
    torch.manual_seed(0)
    assert torch.equal(shapes_model.generate("what color is the", 4, do_sample=True, top_k=1, return_type="tokens"),
                       greedy[0])  # top_k=1 sampling is greedy: top_k reached the sampler
    assert isinstance(shapes_model.generate("what color is the", 4), str)  # TransformerLens's default "input"


def test_generate_vlm_inputs_return_types(shapes_model, sample):
    inputs, _ = sample
    new = shapes_model.generate(inputs, 3, stop_at_eos=False)
    both = shapes_model.generate(inputs, 3, stop_at_eos=False, return_type="input")
    assert torch.equal(both, torch.cat([inputs.input_ids, new], 1))
    text = shapes_model.generate(inputs, 3, stop_at_eos=False, return_type="str")
    assert text == [shapes_model.tokenizer.decode(new[0], skip_special_tokens=True).strip()]
    torch.manual_seed(0)
    assert torch.equal(shapes_model.generate(inputs, 3, stop_at_eos=False, do_sample=True, top_k=1), new)
    stop = int(new[0, 0])
    assert shapes_model.generate(inputs, 3, eos_token_id=[stop]).shape[1] == 1  # stops on any id of the list


# ---------------------------------------------------------------------------------------------- 7: knockout
def test_knockout_window_covering_the_model_warns(shapes_model, sample):
    inputs, logits = sample
    n_layers = shapes_model.cfg.n_layers
    with pytest.warns(SelectionWarning, match=f"window=9 is at least the model's n_layers={n_layers}"):
        attention_knockout(shapes_model, inputs, "image", "last", window=9, layers=[1])
    assert list(window_layers(2, 2, n_layers)) == [1, 2]  # an even window blocks exactly that many layers
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionWarning)
        attention_knockout(shapes_model, inputs, "image", "last", window=2, layers=[1])
    for bad in (0, 2.5, True):
        with pytest.raises(PromptError, match="window"):
            attention_knockout(shapes_model, inputs, "image", "last", window=bad)
    assert_untouched(shapes_model, inputs, logits)


def test_knockout_refuses_non_integer_layers_and_positions(shapes_model, sample):
    inputs, logits = sample
    calls = {
        "1.7": lambda: attention_knockout(shapes_model, inputs, "image", "last", window=1, layers=[1.7]),
        "2.5": lambda: attention_knockout(shapes_model, inputs, [2.5], "last", window=1),
        "1.5": lambda: knockout_hooks(shapes_model, [0], [5], layers=[1.5]),
        "0.5": lambda: knockout_hooks(shapes_model, [0.5], [5]),
        "3.25": lambda: norm_attention(shapes_model, inputs, layers=[3.25]),
        "9.5": lambda: logit_lens(shapes_model, inputs, positions=[9.5]),
    }
    for culprit, call in calls.items():
        with pytest.raises(PromptError, match="whole numbers") as err:
            call()
        assert culprit in str(err.value)
    with pytest.raises(PromptError, match="booleans"):
        attention_knockout(shapes_model, inputs, [True], "last", window=1)
    ref = attention_knockout(shapes_model, inputs, [3, 4], "last", window=1, layers=[1, 2])
    for src, lay in [(np.array([3, 4]), np.array([1, 2])), (torch.tensor([3, 4]), torch.tensor([1, 2])),
                     (torch.tensor([3.0, 4.0]), [np.int64(1), np.int32(2)])]:
        res = attention_knockout(shapes_model, inputs, src, "last", window=1, layers=lay)
        assert torch.equal(res.p_knocked, ref.p_knocked)
    assert_untouched(shapes_model, inputs, logits)


def test_knockout_hooks_without_inputs_resolve_and_check_positions(shapes_model, sample):
    inputs, logits = sample
    n = inputs.seq_len
    image = inputs.image_positions
    explicit = shapes_model.run_with_hooks(inputs, fwd_hooks=knockout_hooks(shapes_model, image, [n - 1]))
    negative = shapes_model.run_with_hooks(inputs, fwd_hooks=knockout_hooks(shapes_model, image - n, [-1]))
    named = shapes_model.run_with_hooks(inputs, fwd_hooks=knockout_hooks(shapes_model, "image", "last", inputs=inputs))
    assert torch.equal(explicit, negative) and torch.allclose(explicit, named, atol=1e-6)
    assert not torch.allclose(explicit[0, -1], logits[0, -1])
    for positions in ([n], [-n - 1]):
        with pytest.raises(PromptError, match=f"outside the {n}-token sequence") as err:
            shapes_model.run_with_hooks(inputs, fwd_hooks=knockout_hooks(shapes_model, positions, [n - 1]))
        assert str(positions[0]) in str(err.value)
    with pytest.raises(PromptError, match="built for inputs"):  # hooks made for one input, run on another
        other = shapes_model.prepare("what color is the circle ?", None)
        shapes_model.run_with_hooks(other, fwd_hooks=knockout_hooks(shapes_model, "image", "last", inputs=inputs))
    assert_untouched(shapes_model, inputs, logits)


def test_block_attention_with_a_kv_cache_counts_positions_of_the_full_sequence():
    scores = torch.zeros(1, 2, 3, 7)  # 3 query rows after 4 cached positions
    out = block_attention([0, -2], [-1, 5, 1])(scores)
    blocked = torch.isinf(out[0, 0])
    expected = torch.zeros(3, 7, dtype=torch.bool)
    expected[2, [0, 5]] = True  # target -1 = position 6 = row 2
    expected[1, [0, 5]] = True  # target 5 = row 1; target 1 is cached (not recomputed)
    assert torch.equal(blocked, expected)
    with pytest.raises(PromptError, match="query_offset=2"):
        block_attention([0], [5], query_offset=2)(scores)


# ---------------------------------------------------------------------------------------------- 8: fingerprint
def test_inputs_from_another_model_are_refused(shapes_model, sample, hooked, rec):
    inputs, logits = sample
    tiny = hooked("llava")
    tiny_logits = tiny(tiny.prepare("What color is the circle ?", noise_image(60, 40)))
    for run in (lambda: tiny(inputs), lambda: tiny.generate(inputs, 2), lambda: logit_lens(tiny, inputs),
                lambda: attention_knockout(tiny, inputs, "image", "last", window=1),
                lambda: image_token_truncation(tiny, inputs, "a red circle", counts=[1])):
        with pytest.raises(PromptError, match="prepared by") as err:
            run()
        assert "shapes-llava" in str(err.value) and "'llava'" in str(err.value)
        assert no_hooks(tiny)
    assert inputs[0].tokenizer_fingerprint == inputs.tokenizer_fingerprint
    with pytest.raises(PromptError, match="llava_next"):  # same words, another family and image processor
        hooked("llava_next")(tiny.prepare("What color is the circle ?", noise_image(60, 40)))
    legacy = replace(inputs, tokenizer_fingerprint=None)  # hand-built inputs without a fingerprint still run
    assert torch.equal(shapes_model(legacy), logits)
    assert torch.equal(tiny(tiny.prepare("What color is the circle ?", noise_image(60, 40))), tiny_logits)
    assert_untouched(shapes_model, inputs, logits)


def test_hand_built_vlm_inputs_keep_working(shapes_model, sample):
    inputs, logits = sample
    fields = {k: getattr(inputs, k) for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "prompts",
                                              "questions", "layouts", "offsets", "image_token_id")}
    assert torch.equal(shapes_model(VLMInputs(**fields)), logits)


# ---------------------------------------------------------------------------------------------- 9: SelectionWarning
def test_empty_knockout_sets_warn_naming_the_set(shapes_model, sample, rec):
    inputs, logits = sample
    far = {"x": 500, "y": 500, "w": 4, "h": 4}  # outside the 64 x 64 image
    with warnings.catch_warnings(record=True) as caught:  # the box and the empty source each warn
        warnings.simplefilter("always")
        res = attention_knockout(shapes_model, inputs, "related", "question", window=1, box=far)
    said = [str(w.message) for w in caught if issubclass(w.category, SelectionWarning)]
    assert any("lies off the image" in m for m in said)
    assert any("source 'related' selects no position for example 0" in m for m in said)
    assert res.relative_change.abs().max() == 0
    with pytest.warns(SelectionWarning, match="source 'last' lies entirely after the target 'image'"):
        attention_knockout(shapes_model, inputs, "last", "image", window=1)
    text = shapes_model.prepare("what color is the circle ?")
    with pytest.warns(SelectionWarning, match="source 'image' selects no position"):
        knockout_flows(shapes_model, text, window=1)
    assert_untouched(shapes_model, inputs, logits)


@pytest.mark.parametrize("caption", ["", "the a of", "?!"])
def test_caption_without_content_words_warns(shapes_model, sample, caption):
    inputs, logits = sample
    with pytest.warns(SelectionWarning, match="no content words") as rec_warn:
        res = visual_verbalization(shapes_model, inputs, caption)
    assert repr(caption) in str(rec_warn[0].message) and torch.isnan(res.recall).all()
    assert_untouched(shapes_model, inputs, logits)


def test_empty_and_degenerate_position_selections_warn(shapes_model, sample):
    inputs, logits = sample
    with pytest.warns(SelectionWarning, match="select no position"):
        lens = logit_lens(shapes_model, inputs, positions=[])
    assert lens.resid.shape[1] == 0
    image = inputs.image_positions
    with pytest.warns(SelectionWarning, match="image set has one position"):
        res = contextualization(shapes_model, inputs, image=image[:1])
    assert torch.isnan(res.intra_image).all()
    with pytest.warns(SelectionWarning, match="share positions"):
        contextualization(shapes_model, inputs, image=image, text=image[:3])
    with pytest.raises(PromptError, match="outside the"):
        contextualization(shapes_model, inputs, image=[inputs.seq_len + 5])
    with pytest.raises(PromptError, match="No query positions"):
        norm_attention(shapes_model, inputs, query_positions=[])
    with pytest.raises(PromptError, match="counts must be non-empty"):
        image_token_truncation(shapes_model, inputs, "red circle", counts=[])
    with pytest.warns(SelectionWarning, match=r"Interval \(3, 3\) selects no image token"):
        image_token_masking(shapes_model, inputs, "red circle", [(3, 3), (0, 2)])
    for make in (lambda: record({}, []), lambda: zero_ablate([]), lambda: pattern_rows({}, [])):
        with pytest.warns(SelectionWarning, match="select no position"):
            make()
    with pytest.raises(PromptError, match="outside the"):
        shapes_model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_pre", record({}, [999]))])
    with pytest.raises(PromptError, match="covers no token"):
        inputs.span(" ")
    with pytest.raises(PromptError, match="occurrence"):
        inputs.span("red", occurrence=-1)
    assert_untouched(shapes_model, inputs, logits)


# ---------------------------------------------------------------------------------------------- properties
_SPECIAL_TEXT = st.sampled_from(SPECIALS + ["<|eot_id|>", "<", ">", "</", "s>", "\u200b", "\ufeff", "\x00"])
_WORDS = st.sampled_from(["red", "circle", "what", "color", "is", "?", "zebra", "Red", "é", "日本", "🙂", "'s"])
_PROMPT = st.lists(st.one_of(_WORDS, _SPECIAL_TEXT, st.text(max_size=6), st.sampled_from([" ", "\n", "\t", "  "])),
                   max_size=8).map("".join)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_PROMPT, template=st.sampled_from(["auto", None]))
def test_prepare_round_trips_or_raises_prompt_error(shapes_model, rec, text, template):
    tok = shapes_model.tokenizer
    image = rec.image if template == "auto" or "<image>" in text else None
    try:
        inputs = shapes_model.prepare(text, image, template=template)
    except PromptError:
        return
    ids = inputs.input_ids[0].tolist()
    # (no decode round trip: the shipped WordPiece decoder's cleanup writes "? ?" as "??", one unknown word)
    prompt = inputs.prompts[0]
    assert text in prompt
    for pos, (a, b) in enumerate(inputs.offsets[0].tolist()):
        if b > a:  # every text position's characters tokenise back to its token
            assert tok(prompt[a:b], add_special_tokens=False)["input_ids"] == [ids[pos]]
    if template == "auto":
        assert not any(t in text for t in SPECIALS)


_POSITIONS = st.one_of(
    st.lists(st.integers(-80, 80), max_size=5),
    st.lists(st.one_of(st.floats(-80, 80), st.just(float("nan"))), min_size=1, max_size=3),
    st.integers(-80, 80),
    st.lists(st.integers(-80, 80), max_size=4).map(lambda v: torch.tensor(v, dtype=torch.long)),
    st.lists(st.integers(-80, 80), max_size=4).map(lambda v: np.array(v, dtype=np.int64)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=_POSITIONS, target=_POSITIONS)
def test_knockout_positions_give_prompt_error_or_a_valid_result(shapes_model, sample, source, target):
    inputs, logits = sample
    n = inputs.seq_len
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionWarning)
        try:
            res = attention_knockout(shapes_model, inputs, source, target, window=1, layers=[2])
        except PromptError:
            res = None
        try:
            hooks = knockout_hooks(shapes_model, source, target, layers=[2])
            with torch.no_grad():
                hooked_logits = shapes_model.run_with_hooks(inputs, fwd_hooks=hooks)
        except PromptError:
            hooked_logits = None
    assert no_hooks(shapes_model)
    # float64, as the library reads them: 2.5e-126 is not a whole number, though float32 rounds it to 0
    values = [torch.as_tensor(np.asarray(v, dtype=np.float64)).flatten() for v in (source, target)]
    whole = all(not v.is_floating_point() or bool((v == v.round()).all()) for v in values)
    inside = all(bool(((v >= -n) & (v < n)).all()) for v in values if whole)
    assert (res is not None) == (whole and inside) == (hooked_logits is not None)
    if res is not None:
        assert torch.isfinite(res.p_knocked).all() and 0 < float(res.p_base) <= 1
        src, tgt = ((v.long() % n) for v in values)
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[tgt[:, None], src[None, :]] = True
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
        if not mask.any():
            assert float(res.relative_change.abs().max()) == 0
        p = hooked_logits[0, -1].softmax(-1)[res.token]
        assert abs(float(p) - float(res.p_knocked[0])) < 1e-4


def test_unknown_question_words_warn_naming_them(shapes_model, rec):
    from hooked_vlm import PromptWarning

    with pytest.warns(PromptWarning, match=r"'zebra'") as caught:
        shapes_model.prepare("What color is the zebra ?", rec.image)
    assert "<unk>" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptWarning)
        shapes_model.prepare(rec.question, rec.image)  # every word known: no warning
