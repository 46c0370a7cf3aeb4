"""Refreshes the book from one run: ./run.sh book-refresh NN [RUN_DIR [SUBFOLDER]].

Copies the figures (PNG), tables (results.md), metrics.json and run.json that one lesson run wrote into
book/src/figures/lessonNN/ (or its SUBFOLDER, for a comparison run such as `lesson06 eval` of an older pipeline),
after checking them against the run's own manifest: run.json lists every file the run wrote with its SHA-256, and
metrics.json and results.md carry the same run stamp (seed, commit, command, CPU, threads). The folder's previous
files go, so a chapter can never show the figures of one run beside the numbers of another; tests/book.rs holds
every folder to that (scratch_diffusion::cli::verify_run_folder). RUN_DIR defaults to out/lessonNN, where
`./run.sh lesson NN` writes.
"""
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEPT = (".png", ".md", "metrics.json", "autoencoder.json")  # figures, tables, numbers; not weights, configs or logs


def fail(message):
    sys.exit(f"error: {message}")


def stamp_of_results(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    if not (first.startswith("<!-- run ") and first.endswith(" -->")):
        fail(f"{path} does not start with its run stamp: rerun the lesson with this commit's code")
    return json.loads(first[len("<!-- run "):-len(" -->")])


def main(argv):
    if not 1 <= len(argv) <= 3 or not (argv[0].isdigit() or argv[0] == "bench"):
        fail("usage: ./run.sh book-refresh NN|bench [RUN_DIR [SUBFOLDER]], for example ./run.sh book-refresh 04")
    name = "bench" if argv[0] == "bench" else f"lesson{int(argv[0]):02d}"
    src = Path(argv[1]) if len(argv) > 1 else ROOT / "out" / name
    dest = ROOT / "book" / "src" / "figures" / name
    if len(argv) > 2:
        if not argv[2].replace("_", "").isalnum():
            fail(f"the subfolder name {argv[2]!r} must be letters, digits and underscores")
        dest = dest / argv[2]
    manifest_path = src / "run.json"
    if not manifest_path.is_file():
        fail(f"{manifest_path} is missing: run {name} first (./run.sh lesson NN, or ./run.sh bench), then refresh")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    stamp, listed = manifest["run"], manifest["sha256"]
    if "+changes" in stamp["commit"] or stamp["commit"] == "unknown":
        fail(f"the run was made from uncommitted code ({stamp['commit']}): commit, rerun, then refresh")
    for name, sha in listed.items():
        path = src / name
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            fail(f"{path} changed after its run wrote it: rerun the lesson")
    metrics = json.loads((src / "metrics.json").read_text(encoding="utf-8"))
    if metrics.get("run") != stamp:
        fail(f"{src}/metrics.json has another run's stamp than run.json")
    if (src / "results.md").exists() and stamp_of_results(src / "results.md") != stamp:
        fail(f"{src}/results.md has another run's stamp than run.json")
    kept = sorted(n for n in listed if n.endswith(KEPT) and (src / n).is_file())
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.iterdir():
        if old.is_file():
            old.unlink()  # the previous run's files; subfolders (other runs) stay
    for name in kept + ["run.json"]:
        shutil.copy2(src / name, dest / name)
    print(f"book/src/figures/{dest.relative_to(ROOT / 'book/src/figures')}: {', '.join(kept)} and run.json")
    print(f"  from `{stamp['command']}`, seed {stamp['seed']}, commit {stamp['commit']}, {stamp['cpu']}, "
          f"{stamp['threads']} threads, {stamp['started_utc']}")


if __name__ == "__main__":
    main(sys.argv[1:])
