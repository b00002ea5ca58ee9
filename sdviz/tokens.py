"""Prompt → tokens → words: what the text encoder saw, grouped back into the words people typed.

CLIP's BPE marks the last piece of every word with `</w>`, so a word is a run of tokens ending in
one; `<|startoftext|>` and `<|endoftext|>` are special and belong to no word. A token added to the
tokenizer (textual inversion: "<cat-toy>", and "<cat-toy>_1" … for its further vectors) is a word
of its own. When only embeddings were given (`prompt_embeds`), tokens are named by position.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Token:
    index: int  # position among the text encoder's 77 inputs
    text: str  # this piece as text ("red", "zeb"); special tokens as written
    word: int | None  # index into `words`, None for special tokens
    special: bool


@dataclass(frozen=True)
class Word:
    index: int
    text: str
    tokens: tuple[int, ...]  # token positions, in order


def _text(tokenizer, ids: list[int], fallback: str) -> str:
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False).strip()
    return text if text and "\ufffd" not in text else fallback.replace("</w>", "")


def tokens_from_ids(tokenizer, ids) -> tuple[list[Token], list[Word]]:
    """Group the ids the text encoder received into tokens and words.

    `ids`: the 77 input ids of one prompt. Keeps `<|startoftext|>`, the prompt's pieces and the first
    `<|endoftext|>`; the padding after it is dropped (its attention is never shown).
    """
    ids = [int(i) for i in ids]
    special_ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    pieces = tokenizer.convert_ids_to_tokens(ids)
    added = set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)
    tokens: list[Token] = []
    words: list[Word] = []
    current: list[int] = []

    def close_word():
        if current:
            text = _text(tokenizer, [ids[i] for i in current], "".join(pieces[i] for i in current))
            words.append(Word(len(words), text, tuple(current)))
            current.clear()

    for pos, (tid, piece) in enumerate(zip(ids, pieces)):
        if tid in special_ids or piece in tokenizer.all_special_tokens:
            close_word()
            tokens.append(Token(pos, piece, None, True))
            if pos > 0 and tid == tokenizer.eos_token_id:
                break
            continue
        if piece in added:
            close_word()
            # textual inversion writes a multi-vector token as "<t> <t>_1 <t>_2": one word, "<t>"
            previous = words[-1] if words and pos > 0 and words[-1].tokens[-1] == pos - 1 else None
            if previous is not None and _continues(piece, previous.text):
                words[-1] = Word(previous.index, previous.text, (*previous.tokens, pos))
                tokens.append(Token(pos, piece, previous.index, False))
                continue
            current.append(pos)
            tokens.append(Token(pos, piece, len(words), False))
            close_word()
            continue
        current.append(pos)
        tokens.append(Token(pos, _text(tokenizer, [tid], piece), len(words), False))
        if piece.endswith("</w>"):
            close_word()
    close_word()
    return tokens, words


def _continues(piece: str, word: str) -> bool:
    """Whether added token `piece` is a further vector of added word `word` ("<t>_2" of "<t>")."""
    head, _, number = piece.rpartition("_")
    return head == word and number.isdigit()


def tokens_by_index(count: int) -> tuple[list[Token], list[Word]]:
    """`count` tokens named by position ("#0" … "#76"), each its own word: for embeddings whose text is unknown."""
    tokens = [Token(i, f"#{i}", i, False) for i in range(count)]
    return tokens, [Word(i, f"#{i}", (i,)) for i in range(count)]


def truncated_text(tokenizer, prompt: str) -> str:
    """The part of `prompt` that does not fit in the text encoder's window ("" when it all fits)."""
    limit = tokenizer.model_max_length - 2  # room for <|startoftext|> and <|endoftext|>
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    if len(ids) <= limit:
        return ""
    return tokenizer.decode(ids[limit:]).strip()


def to_json(tokens: list[Token], words: list[Word]) -> dict:
    return {"tokens": [asdict(t) for t in tokens], "words": [asdict(w) for w in words]}


def from_json(data: dict) -> tuple[list[Token], list[Word]]:
    tokens = [Token(**t) for t in data["tokens"]]
    words = [Word(w["index"], w["text"], tuple(w["tokens"])) for w in data["words"]]
    return tokens, words
