"""What a ``nnunet-moe benchmark`` run has measured so far, on disk as it is measured (``--resume``).

Two files in the output folder:

* ``run.json``: the settings that make the run's numbers comparable (models, modes, cases, device, TTA,
  torch version and threads, ...), written before the first case; ``"finished": true`` once every
  report is written. Written to a temporary file, fsynced and renamed: never half a file.
* ``records.jsonl``: one JSON line per measured case (``{"case": record}``) and one per model whose modes
  are all done (``{"model_done": {"model": name, "modes": [...], "problems": [...]}}``), each appended and fsynced as
  soon as it exists, so SIGINT or SIGKILL loses at most the case in progress. A line cut short by a
  kill is dropped when the run is resumed (and from the file, before anything is appended).

``Journal.resume`` refuses a folder whose settings differ from the new run's: cases measured with
other modes, cases, device or threads would end up averaged together.
"""
from __future__ import annotations

import json
import os

RUN_FILE = "run.json"
RECORDS_FILE = "records.jsonl"


def write_json_atomic(path: str, content) -> None:
    """``content`` as JSON at ``path``: a temporary file in the same folder, fsynced, renamed over ``path``."""
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(content, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    _fsync_folder(os.path.dirname(path))


def _fsync_folder(folder: str) -> None:
    descriptor = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)  # makes the rename itself durable
    finally:
        os.close(descriptor)


def _read_lines(path: str) -> tuple:
    """(parsed entries, number of unreadable lines) of ``records.jsonl``."""
    entries, bad = [], 0
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(entry, dict) and ("case" in entry or "model_done" in entry):
                entries.append(entry)
            else:
                bad += 1
    return entries, bad


def _as_json(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str))  # tuples as lists: compares with what was read back


def _differences(before: dict, now: dict) -> list:
    return [f"{key} {before.get(key)!r} (now {now.get(key)!r})" for key in sorted(set(before) | set(now))
            if before.get(key) != now.get(key)]


class Journal:
    """The durable record of one run in ``out_dir``: start it, or resume it; then append as cases finish."""

    def __init__(self, out_dir: str, run: dict, entries: list):
        self.out_dir = out_dir
        self.run = run
        self.session = run["sessions"] - 1  # 0: the first process; 1: the first resume ...
        self._cases = {}
        self._models = {}
        for entry in entries:
            if "case" in entry:
                record = entry["case"]
                self._cases[(record["model"], record["mode"], record["case"])] = record
            else:
                self._models[entry["model_done"]["model"]] = entry["model_done"]
        self._file = open(os.path.join(out_dir, RECORDS_FILE), "a")

    @classmethod
    def start(cls, out_dir: str, settings: dict) -> Journal:
        """A new run in ``out_dir``, which must not exist yet (the caller chose a free folder)."""
        os.makedirs(out_dir)
        run = {"settings": _as_json(settings), "finished": False, "sessions": 1}
        write_json_atomic(os.path.join(out_dir, RUN_FILE), run)
        return cls(out_dir, run, [])

    @staticmethod
    def interrupted_run(out_dir: str) -> dict:
        """The ``run.json`` content of the unfinished run in ``out_dir``; ValueError saying why there is none."""
        run_file = os.path.join(out_dir, RUN_FILE)
        if not os.path.isdir(out_dir):
            raise ValueError(f"--resume: {out_dir} does not exist, so there is no run to resume; give the folder "
                             f"of the interrupted run with -o, or run without --resume")
        if not os.path.isfile(run_file):
            raise ValueError(f"--resume: {out_dir} has no {RUN_FILE}, so it is not the folder of a benchmark run that "
                             f"can be resumed (runs of this version write it first); run without --resume (a new "
                             f"folder is used, {out_dir} is left as it is)")
        with open(run_file) as f:
            run = json.load(f)
        if run.get("finished"):
            raise ValueError(f"--resume: the run in {out_dir} has finished (its reports are written); nothing to "
                             f"resume. Without --resume a new run goes to a new folder.")
        return run

    @classmethod
    def resume(cls, out_dir: str, settings: dict, log=print) -> Journal:
        """The interrupted run in ``out_dir``; ValueError when there is none or its settings differ."""
        run = cls.interrupted_run(out_dir)
        differences = _differences(run["settings"], _as_json(settings))
        if differences:
            raise ValueError(f"--resume: the run in {out_dir} was started with other settings: "
                             f"{'; '.join(differences)}. Its numbers would not compare with this run's: resume with "
                             f"the interrupted run's options, or run without --resume (a new folder is used).")
        records_file = os.path.join(out_dir, RECORDS_FILE)
        entries, bad = _read_lines(records_file) if os.path.isfile(records_file) else ([], 0)
        if bad:
            # a line cut short by a kill: rewrite the file without it before appending behind it
            with open(records_file + ".tmp", "w") as f:
                f.writelines(json.dumps(entry, default=str) + "\n" for entry in entries)
                f.flush()
                os.fsync(f.fileno())
            os.replace(records_file + ".tmp", records_file)
            log(f"Resume: dropped {bad} incomplete record line(s) of {records_file} (written when the run was killed)")
        run["sessions"] = run.get("sessions", 1) + 1
        write_json_atomic(os.path.join(out_dir, RUN_FILE), run)
        journal = cls(out_dir, run, entries)
        log(f"Resume: {len(journal._cases)} case record(s) and {len(journal._models)} finished model(s) from "
            f"{out_dir} are kept, not measured again")
        return journal

    def case_record(self, model: str, mode: str, case: str) -> dict | None:
        return self._cases.get((model, mode, case))

    def model_done(self, model: str) -> dict | None:
        """``{"model", "modes", "problems"}`` of a model whose every mode is done (``modes``: those with
        results, in order), else None."""
        return self._models.get(model)

    def _append(self, entry: dict) -> None:
        self._file.write(json.dumps(entry, default=str) + "\n")  # one write per line: a kill cuts at most this one
        self._file.flush()
        os.fsync(self._file.fileno())

    def add_case(self, record: dict) -> None:
        self._cases[(record["model"], record["mode"], record["case"])] = record
        self._append({"case": record})

    def add_model_done(self, model: str, modes: list, problems: list) -> None:
        self._models[model] = {"model": model, "modes": list(modes), "problems": list(problems)}
        self._append({"model_done": self._models[model]})

    def finish(self) -> None:
        """Mark the run finished (after its reports are written): it cannot be resumed any more."""
        self.close()
        self.run["finished"] = True
        write_json_atomic(os.path.join(self.out_dir, RUN_FILE), self.run)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
