"""Strict input and safe output: JSONL reading whose errors name file, line and field, atomic writes, and the guards
that refuse to clobber an input or a finished run."""
import gzip
import hashlib
import json
import math
import os

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
    records, lines, schema = [], [], None
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
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


def cli(main):
    """Run a stage's main() from the command line: bad input ends in one line 'error: FILE:LINE: field ...' and exit
    status 1, not a traceback (tests call main(argv) and see the DataError itself)."""
    try:
        main()
    except DataError as e:
        raise SystemExit(f"error: {e}") from None


FIELD_KINDS = {  # kind → (test, what the error says the field must be)
    "id": (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a string or an integer"),
    "text": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "degree": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               and -90 <= v <= 90, "a number of degrees in [-90, 90]"),
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
    """Refuse duplicate ids: the later stages and resumed runs key records by them."""
    seen = {}
    for line, rec in zip(lines, records):
        if field in rec:
            if rec[field] in seen:
                raise DataError(f"{path}:{line}: duplicate {field} {rec[field]!r} (first on line {seen[rec[field]]})")
            seen[rec[field]] = line


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


def parse_degrees(text, flag):
    """'-45,0,45' → [-45.0, 0.0, 45.0]; anything that is not a list of angles in [-90, 90] exits naming the flag."""
    try:
        degrees = [float(d) for d in text.split(",")]
        for d in degrees:
            degree_to_vector(d)
    except ValueError as e:
        raise SystemExit(f"error: {flag} {text!r}: a comma list of angles in [-90, 90] degrees is needed ({e})")
    return degrees


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
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path, overwrite, inputs=()):
    """Refuse to clobber an existing output (unless --overwrite) or any input, or to write a file over a folder."""
    if any(_same_path(path, p) for p in inputs if p):
        raise SystemExit(f"error: output {path} is also an input; choose another path")
    if os.path.isdir(path):
        raise SystemExit(f"error: output {path} is a directory; expected a file path")
    if os.path.exists(path) and not overwrite:
        raise SystemExit(f"error: {path} exists; pass --overwrite to replace it")


def check_output_dir(out, overwrite, resume, inputs=()):
    """A training stage's output folder. Refuses: a file; a folder that is or holds an input; a finished run
    (meta.json) or any non-empty folder unless --overwrite; an interrupted run (checkpoint.pt) unless --resume or
    --overwrite. → the checkpoint to resume from, or None."""
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: output {out} is a file; expected a folder")
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

