"""IncrementalDetokenizer against real tokenizers: the default model's byte-level BPE and a
SentencePiece-style (metaspace, byte fallback) tokenizer built on the fly.

The oracle is always a plain `decode` of the whole sequence: the deltas joined must equal it
(cut at the stop string), and at every step the text emitted so far must be a prefix of the
final text, which is what "never emits a split character or a partial stop string" means.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from engine_svc.models.detokenizer import IncrementalDetokenizer
from engine_svc.models.tokenizer import Tokenizer
from protos.errors import InvalidRequestError

REPLACEMENT = "\ufffd"

# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    """The default model's tokenizer (byte-level BPE, ByteLevel decoder)."""
    from engine_svc.models.fetch import fetch_default_model

    return Tokenizer(fetch_default_model(progress=False))


# Words the SentencePiece-style vocabulary has whole; everything else falls back to
# characters, and characters outside ASCII + "é" to <0xXX> byte tokens.
_SP_WORDS = ["▁the", "▁hello", "▁world", "▁END", "▁caf", "▁is", "▁and", "▁of", "▁stop", "ing"]


def _sp_tokenizer(directory: Path, style: str) -> Tokenizer:
    """A tiny Llama-2-like tokenizer: BPE with byte fallback, "▁" for spaces, BOS added.

    "llama2" is Llama-2's own tokenizer.json layout (Prepend/Replace normalizer, a
    Replace/ByteFallback/Fuse/Strip decoder); "metaspace" uses the Metaspace
    pre-tokenizer and decoder instead. Both drop the space of the first "▁" in a decode.
    """
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁" + string.ascii_letters + string.digits + string.punctuation + "é":
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in _SP_WORDS:  # merge each word left to right
        cur = word[0]
        for c in word[1:]:
            if cur + c not in vocab:
                merges.append((cur, c))
                vocab[cur + c] = len(vocab)
            cur += c
    tok = HFTokenizer(
        models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if style == "llama2":
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace("▁", prepend_scheme="first")]
        )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return Tokenizer(directory)


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def sp(request, tmp_path_factory) -> Tokenizer:
    return _sp_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module", params=["smol", "llama2", "metaspace"])
def any_tok(request, tmp_path_factory) -> Tokenizer:
    if request.param == "smol":
        return request.getfixturevalue("smol")
    return _sp_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


# ----------------------------------------------------------------------------- helpers


def out_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def completion(tok: Tokenizer, prompt: list[int], out: list[int], skip: bool = True) -> str:
    """The output's text as a whole-sequence decode sees it (in the prompt's context).

    Equals decode(out) for byte-level BPE; for SentencePiece the first output token keeps
    its leading space when the prompt precedes it, as it does in the full text.
    """
    full, head = tok.decode(prompt + out, skip), tok.decode(prompt, skip)
    assert full.startswith(head)
    return full[len(head) :]


def feed(
    detok: IncrementalDetokenizer,
    ids: Sequence[int],
    chunk: int = 1,
    final_text: str | None = None,
) -> list[str]:
    """Feed `ids` `chunk` at a time, then finish(); return every delta (finish's last).

    With `final_text`, check after every call that what was emitted is a prefix of it: no
    split character and no partial stop string ever leaks ahead of its resolution.
    """
    deltas = []
    for i in range(0, len(ids), chunk):
        deltas.append(detok.add(list(ids[i : i + chunk])))
        if final_text is not None:
            assert final_text.startswith(detok.text), (detok.text, final_text)
    deltas.append(detok.finish())
    assert "".join(deltas) == detok.text
    return deltas


def splits_a_character(tok: Tokenizer, ids: list[int]) -> bool:
    return any(REPLACEMENT in tok.decode([t]) for t in ids)


# ----------------------------------------------------------------------------- no stops

MULTIBYTE = [
    " 😀",
    " Hi 😀🎉 there",
    " 日本語のテキスト",
    " café naïve résumé Ångström",
    " mixed: ñ 中文 🚀 ok",
]


def test_ascii_one_delta_per_token(smol):
    prompt = smol.encode("The capital of France is")
    out = out_ids(smol, " Paris, and the capital of Spain is Madrid.")
    deltas = feed(IncrementalDetokenizer(smol, prompt), out)
    assert deltas == [smol.decode([t]) for t in out] + [""]
    assert "".join(deltas) == " Paris, and the capital of Spain is Madrid."


def test_emoji_held_until_complete(smol):
    out = out_ids(smol, " 😀")
    assert len(out) == 2  # the emoji's four bytes are split over two tokens
    detok = IncrementalDetokenizer(smol, smol.encode("Smile:"))
    assert detok.add(out[:1]) == ""
    assert detok.add(out[1:]) == " 😀"
    assert detok.finish() == ""


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_split_across_tokens(any_tok, text):
    prompt = any_tok.encode("Say:")
    out = out_ids(any_tok, text)
    assert splits_a_character(any_tok, out)  # else the test would prove nothing
    expected = completion(any_tok, prompt, out)
    assert expected.strip() == text.strip()
    deltas = feed(IncrementalDetokenizer(any_tok, prompt), out, final_text=expected)
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) == expected


def test_byte_level_join_equals_plain_decode(smol):
    """Byte-level BPE: context or not, the join is exactly decode(output ids)."""
    for text in MULTIBYTE + [" plain words", "no leading space"]:
        out = out_ids(smol, text)
        for prompt in ([], smol.encode("Hello there, friend")):
            assert "".join(feed(IncrementalDetokenizer(smol, prompt), out)) == smol.decode(out)


def test_sentencepiece_first_token_space_from_prompt_context(sp):
    out = out_ids(sp, "world")
    assert [sp.id_to_token(t) for t in out] == ["▁world"]
    # After a prompt the "▁" is a real space, as in decode(prompt + out)...
    assert feed(IncrementalDetokenizer(sp, sp.encode("hello")), out) == [" world", ""]
    assert sp.decode(sp.encode("hello") + out) == "hello world"
    # ...without one the decoder strips it, as decode(out) does.
    assert feed(IncrementalDetokenizer(sp, []), out) == ["world", ""]
    assert sp.decode(out) == "world"


def test_sentencepiece_long_prompt_and_no_leading_space(sp):
    prompt = sp.encode("the hello world and the world of the stop is hello")
    assert len(prompt) > 5  # only the last few prompt tokens are context
    out = [sp.token_id("ing")] + out_ids(sp, "the world")  # no leading "▁"
    assert "".join(feed(IncrementalDetokenizer(sp, prompt), out)) == "ing the world"
    assert sp.decode(out) == "ing the world"


def test_sentencepiece_lone_space_tokens(sp):
    """A "▁" that opens the next decode window must not eat the following word's space."""
    out = out_ids(sp, "a  b   c")
    assert sp.id_to_token(out[1]) == "▁"
    prompt = sp.encode("hello")
    assert "".join(feed(IncrementalDetokenizer(sp, prompt), out)) == " a  b   c"
    assert "".join(feed(IncrementalDetokenizer(sp, []), out)) == sp.decode(out) == "a  b   c"


def test_prompt_ending_mid_character(smol):
    """A token-id prompt may end inside a character; the output is then decoded on its own."""
    ids = out_ids(smol, " 😀 ok")
    assert smol.decode(ids[:1]).endswith(REPLACEMENT)
    prompt, out = smol.encode("Hi") + ids[:1], ids[1:]
    assert "".join(feed(IncrementalDetokenizer(smol, prompt), out)) == smol.decode(out)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(smol, skip):
    im_end = smol.token_id("<|im_end|>")
    out = out_ids(smol, " Hi") + [im_end] + out_ids(smol, " there")
    detok = IncrementalDetokenizer(smol, smol.encode("Say hi"), skip_special_tokens=skip)
    deltas = feed(detok, out)
    assert "".join(deltas) == (" Hi there" if skip else " Hi<|im_end|> there")
    assert "".join(deltas) == smol.decode(out, skip)
    assert deltas[1] == ("" if skip else "<|im_end|>")


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens_sentencepiece(sp, skip):
    eos = sp.token_id("</s>")
    prompt = sp.encode("hello")
    out = out_ids(sp, "the") + [eos] + out_ids(sp, "world")
    deltas = feed(IncrementalDetokenizer(sp, prompt, skip_special_tokens=skip), out)
    assert "".join(deltas) == (" the world" if skip else " the</s> world")
    assert "".join(deltas) == completion(sp, prompt, out, skip)


@pytest.mark.parametrize("chunk", [2, 3, 7, 1000])
def test_chunked_feeding_matches_one_at_a_time(any_tok, chunk):
    prompt = any_tok.encode("hello")
    out = out_ids(any_tok, "the world 😀 café 日本語 and the stop of ENDing")
    one = "".join(feed(IncrementalDetokenizer(any_tok, prompt), out))
    many = "".join(feed(IncrementalDetokenizer(any_tok, prompt), out, chunk=chunk))
    assert many == one == completion(any_tok, prompt, out)


def test_decode_window_stays_short(smol):
    """Each decode call sees a few tokens, not the whole sequence (cost O(window))."""
    lengths: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            lengths.append(len(ids))
            return smol.decode(ids, skip_special_tokens)

    out = out_ids(smol, " The quick brown fox jumps over the lazy dog 🦊." * 40)
    assert len(out) > 400
    text = "".join(feed(IncrementalDetokenizer(Counting(), smol.encode("Once")), out))
    assert text == smol.decode(out)
    assert max(lengths) <= 8


# ----------------------------------------------------------------------------- stop strings


def test_stop_string_spanning_tokens(smol):
    out = out_ids(smol, " The answer is 42. END OF TEXT and then more words")
    stop = "END OF TEXT"
    detok = IncrementalDetokenizer(smol, smol.encode("Q:"), stop=[stop])
    expected = " The answer is 42. "
    i, deltas = 0, []
    while not detok.stopped:
        deltas.append(detok.add([out[i]]))
        assert expected.startswith(detok.text)
        i += 1
    assert smol.decode(out[:i]).endswith(stop)  # stopped on the token completing it
    assert "".join(deltas) == detok.text == expected
    assert detok.matched_stop == stop
    assert detok.add(out[i:]) == ""
    assert detok.finish() == ""
    assert detok.text == expected


def test_stop_prefix_then_diverges_is_emitted_later(smol):
    out = out_ids(smol, " ENDGAME is not the END. Ignored")
    detok = IncrementalDetokenizer(smol, [], stop=["END."])
    deltas = feed(detok, out, final_text=" ENDGAME is not the ")
    assert [smol.id_to_token(t) for t in out[:3]] == ["ĠEND", "GA", "ME"]
    # "END" could start "END." and is held, then released once "GA" rules that out; the
    # "E" of "ME" is held again.
    assert deltas[:4] == [" ", "ENDGA", "M", "E is"]
    assert detok.text == " ENDGAME is not the "
    assert detok.stopped and detok.matched_stop == "END."


def test_finish_flushes_held_stop_prefix(smol):
    out = out_ids(smol, " the very END")
    detok = IncrementalDetokenizer(smol, [], stop=["END!"])
    emitted = "".join(detok.add([t]) for t in out)
    assert emitted == " the very "
    assert detok.finish() == "END"
    assert detok.text == " the very END" == smol.decode(out)
    assert not detok.stopped and detok.matched_stop is None


@pytest.mark.parametrize("include", [False, True])
def test_include_stop_str_in_output(smol, include):
    out = out_ids(smol, " Step one.\n\nStep two.")
    detok = IncrementalDetokenizer(smol, [], stop=["\n\n"], include_stop_str_in_output=include)
    expected = " Step one.\n\n" if include else " Step one."
    assert "".join(feed(detok, out, final_text=expected)) == expected
    assert detok.matched_stop == "\n\n"


def test_earliest_start_wins_over_earlier_end(smol):
    """ "lo w" ends first but "hello world" starts first; in one add() the earliest start wins."""
    out = out_ids(smol, " say hello world!")
    detok = IncrementalDetokenizer(smol, [], stop=["lo w", "hello world"])
    assert detok.add(out) == " say "
    assert detok.matched_stop == "hello world"


def test_earliest_start_wins_over_list_order(smol):
    out = out_ids(smol, " xab")
    detok = IncrementalDetokenizer(smol, [], stop=["b", "a"])
    assert detok.add(out) == " x"
    assert detok.matched_stop == "a"


@pytest.mark.parametrize("include", [False, True])
def test_same_start_longest_wins(smol, include):
    out = out_ids(smol, " x END OF y")
    detok = IncrementalDetokenizer(
        smol, [], stop=["END", "END OF"], include_stop_str_in_output=include
    )
    assert detok.add(out) == (" x END OF" if include else " x ")
    assert detok.matched_stop == "END OF"


def test_stop_completes_as_soon_as_possible(smol):
    """Token by token, a shorter stop that completes first ends the sequence at once."""
    out = out_ids(smol, " say hello world!")
    detok = IncrementalDetokenizer(smol, [], stop=["hello world", "hello"])
    deltas = feed(detok, out, final_text=" say ")
    assert detok.matched_stop == "hello"
    assert deltas[-1] == ""


def test_stop_string_matching_special_token_text(smol):
    im_end = smol.token_id("<|im_end|>")
    out = out_ids(smol, " Hi") + [im_end] + out_ids(smol, " more")
    detok = IncrementalDetokenizer(smol, [], skip_special_tokens=False, stop=["<|im_end|>"])
    assert "".join(feed(detok, out)) == " Hi"
    assert detok.matched_stop == "<|im_end|>"


def test_stop_after_multibyte_character(any_tok):
    prompt = any_tok.encode("hello")
    out = out_ids(any_tok, "the 日本 END of the world")
    expected = completion(any_tok, prompt, out).split("END")[0]
    detok = IncrementalDetokenizer(any_tok, prompt, stop=["END"])
    deltas = feed(detok, out, final_text=expected)
    assert "".join(deltas) == expected and detok.matched_stop == "END"
    assert not any(REPLACEMENT in d for d in deltas)


def test_stop_in_text_held_for_utf8_matches_at_finish(smol):
    """A byte-level token can end a stop string and start a character ("Ġâ": a space and
    the first byte of e.g. "€"); if the sequence ends there, finish() still finds the stop."""
    out = out_ids(smol, "Wow") + [smol.token_id("Ġâ")]
    assert smol.decode(out) == "Wow " + REPLACEMENT
    detok = IncrementalDetokenizer(smol, [], stop=[" "])
    assert detok.add(out) == ""  # held: the text ends in an incomplete character
    assert detok.finish() == "Wow"
    assert detok.stopped and detok.matched_stop == " "


def test_invalid_stop_strings_rejected(smol):
    with pytest.raises(InvalidRequestError):
        IncrementalDetokenizer(smol, [], stop=[""])


def test_add_after_finish_is_an_error(smol):
    detok = IncrementalDetokenizer(smol, [])
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.add([1])


def test_num_tokens_stops_counting_at_the_stop_string(smol):
    """The offline LLM feeds a sequence what `num_tokens` says it has not taken yet."""
    out = out_ids(smol, " one two END three four")
    assert len(out) == 5
    detok = IncrementalDetokenizer(smol, [], stop=["END"])
    assert detok.add(out[:2]) == " one two" and detok.num_tokens == 2
    assert detok.add(out[2:4]) == " " and detok.stopped
    assert detok.num_tokens == 4  # the token that completed the match, and the one with it
    assert detok.add(out[4:]) == "" and detok.num_tokens == 4


# ----------------------------------------------------------------------------- fuzz


def _random_ids(rng: random.Random, vocab_size: int, n: int) -> list[int]:
    # Mostly low ids (single bytes and short merges, so split characters are common),
    # sometimes anything, special tokens (ids < 17) included.
    return [
        rng.randrange(300) if rng.random() < 0.5 else rng.randrange(vocab_size) for _ in range(n)
    ]


def test_fuzz_random_token_sequences(smol):
    rng = random.Random(1234)
    for _ in range(300):
        prompt = _random_ids(rng, smol.vocab_size, rng.randrange(0, 9))
        out = _random_ids(rng, smol.vocab_size, rng.randrange(1, 40))
        skip = rng.random() < 0.5
        expected = smol.decode(out, skip)
        detok = IncrementalDetokenizer(smol, prompt, skip_special_tokens=skip)
        deltas = feed(detok, out, chunk=rng.choice([1, 1, 2, 5]), final_text=expected)
        assert "".join(deltas) == expected


def test_fuzz_random_stop_strings(smol):
    """One stop string: the result is the full decode cut at its first occurrence, however
    the tokens are chunked."""
    rng = random.Random(99)
    for _ in range(300):
        out = _random_ids(rng, smol.vocab_size, rng.randrange(1, 40))
        full = smol.decode(out)
        if len(full) < 3:
            continue
        a = rng.randrange(len(full) - 1)
        stop = full[a : a + rng.randrange(1, 6)]
        include = rng.random() < 0.5
        cut = full.find(stop)
        expected = full[: cut + len(stop)] if include else full[:cut]
        detok = IncrementalDetokenizer(smol, [], stop=[stop], include_stop_str_in_output=include)
        deltas = feed(detok, out, chunk=rng.choice([1, 1, 3]), final_text=expected)
        assert "".join(deltas) == expected
        assert detok.stopped and detok.matched_stop == stop


def test_fuzz_sentencepiece_texts(sp):
    rng = random.Random(7)
    alphabet = "abcdeé hello world the ENDing 日本語😀🎉ñ  "
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        prompt = sp.encode("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 10))))
        out = out_ids(sp, text)
        expected = completion(sp, prompt, out)
        deltas = feed(
            IncrementalDetokenizer(sp, prompt), out, chunk=rng.choice([1, 2]), final_text=expected
        )
        assert "".join(deltas) == expected
        assert not any(REPLACEMENT in d for d in deltas)


def test_stop_strings_wait_for_min_tokens(smol):
    """As in vLLM: no stop string counts before min_tokens tokens are out, and after that only
    a match that ends in the newly decoded text (an earlier one is not where the text is cut)."""
    out = out_ids(smol, " stop here, then stop again and more")
    assert smol.decode(out[:1]) == " stop"
    detok = IncrementalDetokenizer(smol, [], stop=["stop"], min_tokens=3)
    text = "".join(detok.add([t]) for t in out if not detok.stopped)
    assert detok.stopped and detok.matched_stop == "stop"
    assert text == detok.text == " stop here, then "
    # without min_tokens the first one stops it
    first = IncrementalDetokenizer(smol, [], stop=["stop"])
    first.add(out[:1])
    assert first.stopped and first.text == " "


def test_stop_string_reaching_past_min_tokens_counts(smol):
    """A match that starts before min_tokens is reached and ends after it counts."""
    out = out_ids(smol, " say END OF TEXT now")
    stop = "END OF TEXT"
    k = next(i for i in range(1, len(out)) if stop in smol.decode(out[: i + 1]))
    detok = IncrementalDetokenizer(smol, [], stop=[stop], min_tokens=k + 1)
    text = "".join(detok.add([t]) for t in out[: k + 1])
    assert detok.stopped and text == " say "


# --------------------------------------------------------------- token bytes (OpenAI logprobs)


@pytest.mark.parametrize("text", ["Héllo wörld — 你好 🙂", "tabs\tand\nnew lines", "a  b   c"])
def test_token_bytes_join_to_the_decoded_text(any_tok, text):
    """Each token's bytes, joined, are the UTF-8 of the decoded text: byte-level BPE through
    GPT-2's table, SentencePiece through <0xNN> byte tokens and the ▁ space mark."""
    ids = out_ids(any_tok, text)
    joined = b"".join(any_tok.token_bytes(i) for i in ids)
    decoded = any_tok.decode(ids, skip_special_tokens=False)
    if joined.startswith(b" ") and not decoded.startswith(" "):  # SentencePiece's first ▁
        joined = joined[1:]
    assert joined.decode() == decoded


def test_token_bytes_of_split_characters_and_special_tokens(smol):
    ids = out_ids(smol, "🙂")
    assert len(ids) > 1  # one character over several tokens: each holds part of its bytes
    assert b"".join(smol.token_bytes(i) for i in ids) == "🙂".encode()
    with pytest.raises(UnicodeDecodeError):
        smol.token_bytes(ids[0]).decode()
    end = smol.token_id("<|im_end|>")
    assert smol.token_bytes(end) == b"<|im_end|>"  # an added token stands for its text
