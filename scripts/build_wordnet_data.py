#!/usr/bin/env python3
"""Build the WordNet gloss files shipped in attn_temp/data from a WordNet 3.0 database.

Run it where Debian's `wordnet-base` package is installed (it puts the database in /usr/share/wordnet):

    python scripts/build_wordnet_data.py                      # writes attn_temp/data/wordnet_{noun,verb}.tsv.gz
    python scripts/build_wordnet_data.py --wordnet_dir DIR --output_dir OUT

Each synset line of `data.noun` / `data.verb` becomes one row:

    synset_offset  split  lexname  lemma  definition

- `lexname` is the supersense, read from the two-digit lexicographer file number in the synset line and
  mapped through the fixed table of WordNet 3.0 (lexnames(5WN)). WordNet 3.0 has 26 noun supersenses
  (noun.Tops included) and 15 verb supersenses, and every one of them labels at least one synset.
- `lemma` is the synset's first word form, with underscores turned into spaces.
- `definition` is the gloss without its quoted usage examples (the text before the first `; "`), because
  the examples often repeat the lemma in a sentence and add nothing for the supersense task.
- `split` is train, validation or test (80/10/10), from the SHA-256 of "<pos>:<offset>", so it depends
  only on the synset and not on file order or Python's hash seed.

The output is gzip-compressed with a zero timestamp, so rebuilding from the same database gives the same
bytes. The WordNet 3.0 licence, which permits redistribution with its notice, is copied next to it.
"""

import argparse
import collections
import csv
import gzip
import hashlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

# Lexicographer file numbers of WordNet 3.0, from lexnames(5WN). Numbers 0-2 and 44 are adjective and
# adverb files, which this script does not read.
LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
    8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event", 12: "noun.feeling",
    13: "noun.food", 14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object",
    18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession",
    22: "noun.process", 23: "noun.quantity", 24: "noun.relation", 25: "noun.shape", 26: "noun.state",
    27: "noun.substance", 28: "noun.time",
    29: "verb.body", 30: "verb.change", 31: "verb.cognition", 32: "verb.communication",
    33: "verb.competition", 34: "verb.consumption", 35: "verb.contact", 36: "verb.creation",
    37: "verb.emotion", 38: "verb.motion", 39: "verb.perception", 40: "verb.possession",
    41: "verb.social", 42: "verb.stative", 43: "verb.weather",
}
EXPECTED_CLASS_COUNTS = {"noun": 26, "verb": 15}
COLUMNS = ["synset_offset", "split", "lexname", "lemma", "definition"]
# The usage examples of a gloss start at the first semicolon followed by a double quote.
EXAMPLES_START = re.compile(r';\s*"')


def assign_split(pos: str, offset: str) -> str:
    bucket = int(hashlib.sha256(f"{pos}:{offset}".encode()).hexdigest(), 16) % 10
    if bucket < 8:
        return "train"
    return "validation" if bucket == 8 else "test"


def parse_synset_line(line: str, pos: str) -> dict:
    """Parse one synset line of a WordNet data file (format in wndb(5WN))."""
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset, lex_filenum = fields[0], int(fields[1])
    lexname = LEXNAMES.get(lex_filenum)
    if lexname is None or not lexname.startswith(pos + "."):
        raise ValueError(f"synset {offset} of data.{pos} has lexicographer file {lex_filenum}, not a {pos} file")
    # fields[3] is the word count in hexadecimal, fields[4] the first word form.
    lemma = fields[4].replace("_", " ")
    definition = EXAMPLES_START.split(gloss, maxsplit=1)[0].strip()
    return {
        "synset_offset": offset,
        "split": assign_split(pos, offset),
        "lexname": lexname,
        "lemma": lemma,
        "definition": definition,
    }


def read_synsets(wordnet_dir: Path, pos: str) -> list[dict]:
    path = wordnet_dir / f"data.{pos}"
    if not path.is_file():
        raise FileNotFoundError(
            f"WordNet data file {path} not found. Install Debian's wordnet-base package "
            "(`apt-get install wordnet-base`) or pass --wordnet_dir pointing to a WordNet 3.0 dict folder."
        )
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            # The licence header lines start with two spaces; synset lines start with the 8-digit offset.
            if line.startswith("  "):
                continue
            row = parse_synset_line(line.rstrip("\n"), pos)
            if not row["definition"]:
                raise ValueError(f"synset {row['synset_offset']} of {path} has an empty definition")
            rows.append(row)
    return rows


def write_tsv_gz(rows: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            gz.write(text.getvalue().encode("utf-8"))
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise


def write_licence(source: Path, path: Path) -> None:
    """Copy the WordNet 3.0 licence paragraph out of a Debian copyright file."""
    lines = source.read_text(encoding="utf-8").splitlines()
    start = lines.index("License: WordNet3.0")
    body = []
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        # Debian copyright files indent licence text by one space and mark blank lines with " .".
        body.append("" if line.strip() == "." else line[1:])
    header = (
        "The files wordnet_noun.tsv.gz and wordnet_verb.tsv.gz in this folder are derived from the\n"
        "WordNet 3.0 database (synset offsets, supersenses, first lemmas and definitions), built by\n"
        "scripts/build_wordnet_data.py. WordNet is distributed under the following licence.\n\n"
        "WordNet Release 3.0\n\n"
    )
    path.write_text(header + "\n".join(body).rstrip() + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet_dir", type=Path, default=Path("/usr/share/wordnet"),
                        help="Folder with the WordNet 3.0 files data.noun and data.verb.")
    parser.add_argument("--licence_file", type=Path, default=Path("/usr/share/doc/wordnet-base/copyright"),
                        help="Debian copyright file that contains the WordNet 3.0 licence.")
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parents[1] / "attn_temp" / "data",
                        help="Folder to write wordnet_noun.tsv.gz, wordnet_verb.tsv.gz and LICENSE-wordnet into.")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    for pos in ("noun", "verb"):
        rows = read_synsets(args.wordnet_dir, pos)
        classes = collections.Counter(row["lexname"] for row in rows)
        if len(classes) != EXPECTED_CLASS_COUNTS[pos]:
            raise ValueError(
                f"expected {EXPECTED_CLASS_COUNTS[pos]} {pos} supersenses in WordNet 3.0, found {len(classes)}: "
                f"{sorted(classes)}; is {args.wordnet_dir} a WordNet 3.0 database?"
            )
        out = args.output_dir / f"wordnet_{pos}.tsv.gz"
        write_tsv_gz(rows, out)
        splits = collections.Counter(row["split"] for row in rows)
        print(f"{out}: {len(rows)} synsets, {len(classes)} supersenses, "
              f"splits {dict(sorted(splits.items()))}, {out.stat().st_size / 1e6:.2f} MB")

    write_licence(args.licence_file, args.output_dir / "LICENSE-wordnet")
    print(f"{args.output_dir / 'LICENSE-wordnet'}: WordNet 3.0 licence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
