"""Writes data/prompts/distractors.txt: the English words that lesson 06's caption generator scatters into captions
so the text encoder learns to ignore words that name neither a digit nor an attribute (issue 18).

The words are CLIP's whole-word tokens (data/clip/bpe_simple_vocab_16e6.txt.gz, in merge order, so the most common
first) that are also lower-case entries of a US English word list (Debian's `wamerican`, /usr/share/dict/words),
3 to 10 letters long. Left out: every word that contains a digit's name ("someone" contains "one"), other number
words, the attribute vocabulary, every word of the held-out prompts (held_out.txt, held_out_attributes.txt) (so that those prompts keep words no training
caption has), and a short list of offensive words.

    apt-get install wamerican && python3 data/prompts/make_distractors.py
"""
import gzip
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEEP = 6000
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUMBERS = """ten eleven twelve thirteen fifteen twenty thirty forty fifty hundred thousand million billion trillion
dozen first second third fifth eighth ninth twelfth half quarter number numbers numeral digit digits""".split()
ATTRIBUTES = """thin fine bold thick small little large big left right leaning lean leans slanted slant tilted tilt
written drawn strokes stroke pen""".split()
OFFENSIVE = """sex sexy fuck shit bitch bastard damn dick cock pussy porn nude naked slut whore rape kill killed
killer murder dead death die dies gun guns nazi racist drug drugs cocaine weed hell ass crap suicide terror
terrorist bomb nigga nigger fag gay boob boobs tits penis vagina""".split()

def held_out_words():
    words = set()
    for name in ["held_out.txt", "held_out_attributes.txt"]:
        text = (ROOT / "data/prompts" / name).read_text()
        lines = [l for l in text.splitlines() if l.strip() and not l.startswith("# ")]
        words |= {w for l in lines for w in re.findall(r"[a-z]+", l.lower())}
    return words

def main():
    merges = gzip.open(ROOT / "data/clip/bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8").read().split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    english = {w.strip() for w in open("/usr/share/dict/words", encoding="utf-8") if w.strip().isascii()}
    blocked = set(NUMBERS) | set(ATTRIBUTES) | set(OFFENSIVE) | held_out_words()
    words, seen = [], set()
    for line in merges:
        token = "".join(line.split())
        if not token.endswith("</w>"):
            continue
        w = token[: -len("</w>")]
        ok = w.isalpha() and w.islower() and 3 <= len(w) <= 10 and w in english and w not in seen
        if ok and w not in blocked and not any(d in w for d in DIGITS):
            words.append(w)
            seen.add(w)
    out = ROOT / "data/prompts/distractors.txt"
    header = "# Made by data/prompts/make_distractors.py (read it for what is left out); one word per line, most common first.\n"
    out.write_text(header + "\n".join(words[:KEEP]) + "\n")
    print(f"{len(words)} words, kept {min(KEEP, len(words))} in {out}")

main()
