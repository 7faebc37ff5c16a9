"""Strict input and safe output: JSONL reading whose errors name file, line and field, flag checks that name the flag,
atomic writes (files and folders: a temp name, then a rename), one writer per output (a lock file), and the guards
that refuse to clobber an input or a finished run."""
import atexit
import fcntl
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import zlib

from common import SCHEMA_VERSION, degree_to_vector, rm_encode, rm_text


# ----------------------------------------------------------------------------- JSONL
class DataError(ValueError):
    """Bad input: the message names the file, the line and the field."""


def read_jsonl(path, required=(), with_lines=False):
    """Read a JSONL file (or .jsonl.gz) into a list of dicts; check that each record has the `required` fields.
    with_lines=True returns (line numbers, records), so later checks can name the line (blank lines are skipped).
    Records that carry `schema_version` must all carry the same one, and not a newer one than SCHEMA_VERSION."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a JSONL file")
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    records, lines, schema, lineno = [], [], None, 0
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for lineno, raw in _lines(f, path):
            if lineno == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{path}:1: UTF-16 text (byte-order mark); save the file as UTF-8")
            if b"\x00" in raw:
                raise DataError(f"{path}:{lineno}: NUL bytes (UTF-16 or binary data?); expected UTF-8 JSON lines")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if b"\\u" in raw.lower():  # a lone surrogate (\\ud800) cannot be encoded as text: name its field
                bad = _surrogate_field(rec)
                if bad:
                    raise DataError(f"{path}:{lineno}: field '{bad}' holds a lone UTF-16 surrogate (\\ud800-\\udfff "
                                    f"without its pair): not text")
            for field in required:
                if field not in rec:
                    raise DataError(f"{path}:{lineno}: missing field '{field}'")
            version = rec.get("schema_version")
            if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                        or not 1 <= version <= SCHEMA_VERSION):
                raise DataError(f"{path}:{lineno}: field 'schema_version' is {version!r}; this code reads version "
                                f"{SCHEMA_VERSION} and older")
            if schema is None:
                schema = (lineno, version)
            elif version != schema[1]:
                raise DataError(f"{path}:{lineno}: field 'schema_version' is {version!r} but line {schema[0]} has "
                                f"{schema[1]!r}: mixed schema versions (files from different versions concatenated?)")
            records.append(rec)
            lines.append(lineno)
    return (lines, records) if with_lines else records


def _lines(f, path):
    """(line number, raw line) of an open file; a truncated or corrupt .gz ends in a DataError, not a traceback."""
    lineno = 0
    try:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{path}:{lineno + 1}: truncated or corrupt file ({type(e).__name__}: {e})") from None


def _surrogate_field(value, name=""):
    """The name of the first field (dotted path) of a JSON value holding a lone surrogate, or None."""
    if isinstance(value, str):
        return (name or "(value)") if re.search("[\ud800-\udfff]", value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, str) and re.search("[\ud800-\udfff]", k):
            return f"{name}.{k!r}" if name else repr(k)
        found = _surrogate_field(v, f"{name}.{k}" if name else str(k))
        if found:
            return found
    return None


def cli(main):
    """Run a stage's main() from the command line: bad input ends in one line 'error: FILE:LINE: field ...' and exit
    status 1, not a traceback (tests call main(argv) and see the DataError itself). SIGTERM exits like Ctrl-C does,
    through the cleanup of temp files and locks."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


# ----------------------------------------------------------------------------- flags
FLAG_KINDS = {  # kind → (test, what the error says the flag must be)
    "count": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "count0": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0: off / all)"),
    "pos": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "nonneg": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "finite": (lambda v: math.isfinite(v), "a finite number"),
    "prob": (lambda v: math.isfinite(v) and 0 < v <= 1, "in (0, 1]"),
    "frac": (lambda v: math.isfinite(v) and 0 <= v < 1, "in [0, 1)"),
    "seed": (lambda v: isinstance(v, int) and 0 <= v < 2 ** 32, "an integer in [0, 2^32)"),
}


def check_flags(args, **kinds):
    """Check numeric flags before any work: check_flags(args, batch_size="count", lr="pos"). A list value (nargs) is
    checked item by item; None (an unset optional flag) passes. Exits naming the flag: 'error: --batch-size 0: must
    be an integer >= 1'."""
    for name, kind in kinds.items():
        value = getattr(args, name)
        test, what = FLAG_KINDS[kind]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not test(v):
                raise SystemExit(f"error: --{name.replace('_', '-')} {v!r}: must be {what}")


FIELD_KINDS = {  # kind → (test, what the error says the field must be)
    "id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a string or an integer"),
    "text": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "degree": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               and -90 <= v <= 90, "a number of degrees in [-90, 90]"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
}


def check_fields(path, line, rec, **kinds):
    """Check record field types: check_fields(path, 3, rec, id="id", prompt="text"); a kind ending in '?' allows the
    field to be absent. Raises a DataError naming file, line and field."""
    for field, kind in kinds.items():
        optional, kind = kind.endswith("?"), kind.rstrip("?")
        if field not in rec:
            if optional:
                continue
            raise DataError(f"{path}:{line}: missing field '{field}'")
        test, what = FIELD_KINDS[kind]
        if not test(rec[field]):
            raise DataError(f"{path}:{line}: field '{field}' must be {what}, got {json.dumps(rec[field])[:60]}")


def check_unique(path, lines, records, field="id"):
    """Refuse duplicate ids: the later stages and resumed runs key records by them, and ids built from them (sample.py:
    'PROMPT/θ/hint/k') carry their text, so 1 and "1" are the same id (compared as text)."""
    seen = {}
    for line, rec in zip(lines, records):
        if field in rec:
            key = str(rec[field])
            if key in seen:
                same = seen[key][1] == rec[field] and type(seen[key][1]) is type(rec[field])
                raise DataError(f"{path}:{line}: duplicate {field} {rec[field]!r} (first on line {seen[key][0]}"
                                + (")" if same else f": {seen[key][1]!r}; ids are compared as text)"))
            seen[key] = (line, rec[field])


def check_finite(where, field, value):
    """A reward field must be a finite number (not a bool, a string, NaN or ±inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field '{field}' must be a finite number, got {value!r}")


def check_rm_lengths(tok, prompts, responses, where, template, max_len):
    """RM inputs (common.rm_text) longer than max_len are cut (→ their count); a prompt that alone fills max_len
    leaves no answer to rate: a DataError naming where[k] ('file:line')."""
    texts = [rm_text(tok, p, r, template) for p, r in zip(prompts, responses)]
    n_ids = [len(x) for x in rm_encode(tok, texts, template)["input_ids"]]
    for k in (k for k, n in enumerate(n_ids) if n > max_len):
        n_prompt = len(rm_encode(tok, rm_text(tok, prompts[k], "", template), template)["input_ids"])
        if n_prompt >= max_len:
            raise DataError(f"{where[k]}: field 'prompt' takes {n_prompt} tokens of the RM input; --max-len "
                            f"{max_len} leaves no room for the response")
    return sum(n > max_len for n in n_ids)


def parse_degrees(text, flag, unique=True):
    """'-45,0,45' → [-45.0, 0.0, 45.0]; anything that is not a list of angles in [-90, 90] (each once, unless
    unique=False) exits naming the flag."""
    try:
        degrees = [float(d) for d in text.split(",")]
        for d in degrees:
            degree_to_vector(d)
    except ValueError as e:
        raise SystemExit(f"error: {flag} {text!r}: a comma list of angles in [-90, 90] degrees is needed ({e})")
    if unique and len(set(degrees)) < len(degrees):
        raise SystemExit(f"error: {flag} {text!r}: an angle is listed twice")
    return degrees


def degree_id(degree):
    """θ as it appears in a record id: the shortest text (%g) when it reads back as the same number, else every digit
    (repr), so two different angles never share an id (%g alone keeps 6 digits: 0.1234561 and 0.1234562 collide)."""
    short = f"{degree:g}"
    return short if float(short) == degree else repr(float(degree))


def file_digest(path):
    """sha256 of a file's bytes (identifies the input a partial run or a checkpoint was made from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path, write):
    """write(tmp) to a temp file in path's folder, then os.replace(tmp, path): readers see the old file or the whole
    new one, never a part; on any error (or Ctrl-C) the temp file is removed and nothing else changes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_jsonl(path, records):
    """Write records atomically (atomic_write), fsynced before the rename."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


def write_json(path, obj):
    """One JSON document (indent 1), written atomically (meta.json last marks a finished run)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def _same_path(a, b):
    """The same file or folder: one real path, or (both existing) one inode — a hard link is the same file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(path):
    """Exit now, before any work, if path cannot be written: its nearest existing folder is not a folder or refuses a
    new file (read-only file system, permissions). Missing folders are created when the output is written."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SystemExit(f"error: cannot write {path}: {parent} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".dpa-write-test.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path}: {e.strerror or e} ({parent})") from None


# ----------------------------------------------------------------------------- one writer per output, leftovers
_held = {}  # lock path → open file: held until the run ends (the kernel drops it even on kill -9)
_cleanup = []  # what ends with the run: lock releases, temp folders not yet renamed


def stage_main(main):
    """Decorator of a stage's main(argv): when it returns or raises (an error, Ctrl-C, SIGTERM via cli), this run's
    output locks are released and removed and its unpublished temp folders deleted, so a failed run leaves nothing
    behind and tests can call main() again in the same process."""
    def run(argv=None):
        try:
            return main(argv)
        finally:
            while _cleanup:
                _cleanup.pop()()
    run.__doc__, run.__name__, run.__wrapped__ = main.__doc__, main.__name__, main
    return run


def claim_output(path):
    """Make this process the one writer of output `path` (a file or a folder), then clean the leftovers of earlier
    writers killed mid-save. The lock is an flock on PATH.lock, held until exit (released by the kernel when the
    process dies, so a kill -9 never blocks a rerun) and the file removed at a normal exit; a second writer exits
    at once naming the first one's pid. Leftovers (only ours: names this module makes) are PATH.tmp.PID and
    PATH.old.PID beside path and NAME.tmp.PID files inside a folder path; a folder PATH.old.PID with no PATH is put
    back (the kill fell between the two renames of publish_dir)."""
    path = os.path.normpath(path)
    lock = f"{path}.lock"
    if lock in _held:
        return
    check_writable(lock)
    os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise SystemExit(f"error: {path} is being written by another process (pid {pid}, lock {lock}); wait for "
                             f"it or stop it: one writer per output") from None
        try:  # the file we locked must still be the one at that name (a finishing writer removes it)
            if os.path.samefile(lock, f.fileno()):
                break
        except OSError:
            pass
        f.close()
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[lock] = f

    def release():
        if _held.get(lock) is not f:  # released already (this is the atexit copy)
            return
        del _held[lock]
        if os.path.exists(lock) and os.path.samefile(lock, f.fileno()):
            os.remove(lock)
        f.close()
    _cleanup.append(release)
    atexit.register(release)
    clean_leftovers(path)


def clean_leftovers(path):
    """Remove what killed writers of path left (see claim_output); call only while holding path's lock."""
    folder, name = os.path.split(os.path.abspath(path))
    mine = re.compile(re.escape(name) + r"\.(tmp|old)\.\d+$")
    for n in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = mine.match(n)
        if not m:
            continue
        p = os.path.join(folder, n)
        if m.group(1) == "old" and not os.path.exists(path):
            os.replace(p, path)  # the previous folder, moved away by a publish_dir that did not finish
        elif os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
    if os.path.isdir(path):
        for n in os.listdir(path):
            if re.search(r"\.tmp\.\d+$", n) and os.path.isfile(os.path.join(path, n)):
                os.remove(os.path.join(path, n))


def temp_dir(out):
    """A fresh temp folder OUT.tmp.PID beside out, where a stage saves everything it outputs before publish_dir
    renames it to out; removed at exit if it is still there (an error or SIGTERM before the rename)."""
    tmp = f"{os.path.normpath(out)}.tmp.{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)

    def remove():
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    _cleanup.append(remove)
    atexit.register(remove)
    return tmp


def publish_dir(tmp, out):
    """Rename the complete folder tmp to out (meta.json, the finished mark, written last inside it). An existing out
    (an interrupted run's checkpoint, or a run replaced with --overwrite) is moved to OUT.old.PID first and removed
    after: at every instant out is the old folder, the new one, or absent with OUT.old.PID there to be put back."""
    out = os.path.normpath(out)
    old = f"{out}.old.{os.getpid()}"
    if os.path.lexists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    if os.path.lexists(old):
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def read_meta(folder):
    """A model folder's meta.json → dict ({} when there is none); unreadable or not an object: one-line error."""
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e}): a corrupt or hand-edited file; re-create the "
                         f"folder") from None
    if not isinstance(meta, dict):
        raise SystemExit(f"error: {path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def check_output(path, overwrite, inputs=()):
    """Refuse to clobber an existing output (unless --overwrite) or any input, or to write a file over a folder."""
    if any(_same_path(path, p) for p in inputs if p):
        raise SystemExit(f"error: output {path} is also an input; choose another path")
    if os.path.isdir(path):
        raise SystemExit(f"error: output {path} is a directory; expected a file path")
    if os.path.exists(path) and not overwrite:
        raise SystemExit(f"error: {path} exists; pass --overwrite to replace it")
    check_writable(path)


def check_output_dir(out, overwrite, resume, inputs=()):
    """A training stage's output folder. Refuses: a file; a folder that is or holds an input; a finished run
    (meta.json) or any non-empty folder unless --overwrite; an interrupted run (checkpoint.pt) unless --resume or
    --overwrite. The main process claims out first (claim_output: one writer, leftovers of killed runs cleaned).
    → the checkpoint to resume from, or None."""
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: output {out} is a file; expected a folder")
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 writes OUT
        claim_output(out)
    for p in inputs:
        if p and os.path.exists(p) and (_same_path(out, p) or os.path.realpath(p).startswith(
                os.path.realpath(out) + os.sep)):
            raise SystemExit(f"error: output folder {out} is or contains the input {p}; choose another folder")
    if resume and os.path.exists(ckpt):
        return ckpt
    if os.path.exists(ckpt) and not overwrite:
        raise SystemExit(f"error: {out} holds the checkpoint of an interrupted run; pass --resume to continue it or "
                         f"--overwrite to start over")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        what = "a finished run (meta.json)" if os.path.exists(os.path.join(out, "meta.json")) else "other files"
        raise SystemExit(f"error: {out} exists and holds {what}; pass --overwrite to replace it")
    return None

