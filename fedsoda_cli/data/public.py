"""Public proxy text (`public_data.source`: WikiText-2 raw, the one corpus shipped) cut into
fixed-length token windows for profile and align.

Text layout: the line-oriented WikiText file is grouped into articles (an article starts at a
` = Title = ` line). Inside an article, non-blank lines (headings and paragraphs) are stripped and
joined with "\\n"; blank separator lines are dropped; articles are joined with "\\n\\n". The WikiText
tokenization (`@-@`, spaces around punctuation) is kept as is.

Token stream: each article (with its trailing "\\n\\n") is tokenized on its own, without special
tokens, and the ids are concatenated. Tokenizing per article makes the stream prefix-stable, so the
first n windows are the same whatever n is, and only as many articles as needed are tokenized.
Windows are consecutive and non-overlapping; a partial window at the end is dropped.

Every window starts with the tokenizer's leading special ids (`data.sft.leading_special_ids`: BOS
for Llama-3, Gemma, Mistral; none for SmolLM2), followed by seq_len - len(lead) text tokens, so
profile, align, realign and every perplexity see text the way the model was trained to read it
(task prompts start the same way). Measured on a BOS family: perplexity 165 without BOS, 28 with.

Task prompts (`align.text = "task_prompts"`, what align and realign may train on): the same split,
sentence by sentence (split at " . ", headings and sentences under 4 words skipped), each sentence
filling the next field of the task's prompt template, each prompt followed by a blank line and no
answer; the prompts are tokenized one by one and cut into windows exactly like the articles.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from fedsoda_cli.data.paths import data_file
from fedsoda_cli.errors import DataError
from fedsoda_cli.spec.schema import PublicSource

if TYPE_CHECKING:
    from fedsoda_cli.spec.schema import PublicDataSpec

Split = Literal["valid", "test"]


@dataclass(frozen=True)
class Corpus:
    """Where one public corpus lives: its files under the data folder, and its hub copy."""

    files: dict[str, str]  # split -> path under data.dir
    hub_id: str
    hub_config: str
    hub_splits: dict[str, str]  # split -> the hub's split name


# public_data.source (spec.schema.PublicSource) names one of these; WikiText-2 raw is the only one the
# data folder ships.
CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus(
        files={"valid": "wikitext2/wiki.valid.raw", "test": "wikitext2/wiki.test.raw"},
        hub_id="Salesforce/wikitext",
        hub_config="wikitext-2-raw-v1",
        hub_splits={"valid": "validation", "test": "test"},
    ),
}

# A public sentence poured into a task prompt is cut at this many words (SST-2 reviews average ~19).
_PROMPT_WORDS = 40

# An article title is a level-1 heading: "= Title =" (a section is "= = Section = =").
_TITLE = re.compile(r"^= (?!=).*(?<!=) =$")


def public_windows(spec, part: Literal["train", "held-out"], tokenizer) -> torch.Tensor:
    """The spec's public-text windows: "train" = `public_data.sequences` windows of
    `public_data.split` (what profile, prune and align/realign read), "held-out" =
    `public_data.heldout_sequences` windows of `public_data.heldout_split` (what every before/after
    measurement and perplexity read, never trained on)."""
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.spec import spec_dir

    return public_windows_in(spec.public_data, resolve_data_dir(spec.data, spec_dir(spec)), part, tokenizer)


def public_windows_in(
    public: PublicDataSpec,
    data_dir: Path | None,
    part: Literal["train", "held-out"],
    tokenizer,
    template: str | None = None,
) -> torch.Tensor:
    """`public_windows` for a [public_data] section and a resolved data folder (None = the hub);
    with a prompt `template`, the same windows cut from task prompts of public text."""
    if part == "train":
        return public_sequences(data_dir, public.split, tokenizer, public.sequences, public.seq_len, public.source, template)
    if part == "held-out":
        return public_sequences(
            data_dir, public.heldout_split, tokenizer, public.heldout_sequences, public.seq_len, public.source, template
        )
    raise ValueError(f"public_windows: part must be 'train' or 'held-out', not {part!r}")


def alignment_template(spec) -> str | None:
    """The prompt template ODA's text is poured into (`align.text = "task_prompts"`: the task's), or
    None for plain public text. Whether align reads the task is decided in one place,
    `Spec.align_prompt` (also align's stage input), so the text and the staleness cannot disagree."""
    from fedsoda_cli.data.tasks import prompt_template

    return prompt_template(spec.task) if spec.align_prompt is not None else None


def alignment_windows(spec, tokenizer) -> torch.Tensor:
    """The windows align and realign train on: `public_windows(spec, "train")`, as task prompts
    when `align.text = "task_prompts"`. Every before/after measurement stays on the plain held-out
    windows, so the numbers compare across `align.text`."""
    from fedsoda_cli.data.paths import resolve_data_dir
    from fedsoda_cli.spec import spec_dir

    return public_windows_in(
        spec.public_data, resolve_data_dir(spec.data, spec_dir(spec)), "train", tokenizer, alignment_template(spec)
    )


def public_sequences(
    data_dir: Path | None,
    split: Split,
    tokenizer,
    n: int,
    seq_len: int,
    source: PublicSource = "wikitext2",
    template: str | None = None,
) -> torch.Tensor:
    """The first `n` windows of `seq_len` tokens of the corpus `source`'s `split`, each starting with
    the tokenizer's leading special ids: a LongTensor [n, seq_len]. With a prompt `template`, the
    stream is the split's sentences as task prompts (`task_prompts`) instead of its articles.

    `data_dir` None loads the split from the Hugging Face hub. Deterministic: no sampling.
    Raises DataError when the split has fewer than n windows (the message says how many it has).
    """
    corpus = CORPORA.get(source)
    if corpus is None:
        raise DataError(f"unknown public_data.source {source!r}: use one of {', '.join(CORPORA)}")
    if split not in corpus.files:
        raise DataError(f"unknown public text split {split!r}: use 'valid' or 'test' in [public_data]")
    if n < 1 or seq_len < 1:
        raise ValueError(f"n and seq_len must be positive, got n={n}, seq_len={seq_len}")
    from fedsoda_cli.data.sft import leading_special_ids

    lead = leading_special_ids(tokenizer)
    body = seq_len - len(lead)
    if body < 1:
        raise DataError(
            f"public_data.seq_len = {seq_len} leaves no room for text after the tokenizer's {len(lead)} leading special tokens: raise seq_len"
        )
    lines, where = _load_lines(corpus, data_dir, split)
    articles = wikitext_articles(lines)
    pieces = articles if template is None else task_prompts(articles, template)
    ids = _token_stream(pieces, tokenizer, needed=n * body)
    available = len(ids) // body
    if available < n:
        raise DataError(
            f"{where} has only {available} windows of {seq_len} tokens, {n} were asked for: "
            f"lower sequences / heldout_sequences or seq_len in [public_data]"
        )
    text = torch.tensor(ids[: n * body], dtype=torch.long).view(n, body)
    return torch.cat([torch.tensor([lead] * n, dtype=torch.long).view(n, len(lead)), text], dim=1)


def task_prompts(articles: list[str], template: str, max_words: int = _PROMPT_WORDS) -> list[str]:
    """The articles' sentences poured into a task's prompt template, each prompt followed by a blank
    line: every field of the template takes the next sentence (headings and sentences under 4 words
    are skipped; longer ones are cut at `max_words`). No answer follows a prompt, so what align
    distils at the prompt's last token is the teacher's own answer distribution, never a label."""
    import string

    fields = list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))
    if not fields:
        raise DataError(f'align.text = "task_prompts" needs a task prompt with a {{field}} to fill, not {template!r}')
    sentences = (
        " ".join(words[:max_words])
        for article in articles
        for line in article.split("\n")
        if line and not line.startswith("=")
        for sentence in line.split(" . ")
        if len(words := sentence.strip().rstrip(" .").split()) >= 4
    )
    prompts: list[str] = []
    while True:
        filled = dict(zip(fields, sentences, strict=False))
        if len(filled) < len(fields):
            return prompts
        prompts.append(template.format(**filled) + "\n\n")


def wikitext_articles(lines: Iterable[str]) -> list[str]:
    """Group WikiText lines (without their newline) into article texts, as described above."""
    articles: list[list[str]] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue  # blank separator lines carry no text
        if _TITLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["\n".join(body) + "\n\n" for body in articles]


def hub_rows_to_lines(rows: Iterable[dict]) -> list[str]:
    """Map rows of the hub's `wikitext-2-raw-v1` (one `{"text": line + "\\n"}` per file line) to lines."""
    return [row["text"].rstrip("\n") for row in rows]


def _load_lines(corpus: Corpus, data_dir: Path | None, split: Split) -> tuple[list[str], str]:
    """The split's lines and a name for it in messages: local file, else the hub."""
    if data_dir is not None:
        path = data_file(data_dir, corpus.files[split])
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise DataError(
                f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x}); "
                "WikiText-2 raw is UTF-8: replace the file with the original"
            ) from None
        return text.split("\n"), str(path)
    hub_split = corpus.hub_splits[split]
    return hub_rows_to_lines(_hub_rows(corpus, hub_split)), f"hub {corpus.hub_id}/{corpus.hub_config}[{hub_split}]"


def _hub_rows(corpus: Corpus, hub_split: str):
    import datasets  # imported lazily: slow, and only needed without a local data folder

    try:
        return datasets.load_dataset(corpus.hub_id, corpus.hub_config, split=hub_split)
    except Exception as exc:  # network, auth or hub layout problems all get the same fix
        folder = Path(next(iter(corpus.files.values()))).parent
        raise DataError(
            f"could not load {corpus.hub_id}/{corpus.hub_config} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            f"set data.dir or $FEDSODA_DATA to a folder with {folder}/"
        ) from None


def _token_stream(articles: list[str], tokenizer, needed: int) -> list[int]:
    """Concatenated token ids of the articles, stopping once `needed` tokens are reached."""
    ids: list[int] = []
    for article in articles:
        if len(ids) >= needed:
            break
        ids.extend(tokenizer(article, add_special_tokens=False)["input_ids"])
    return ids
