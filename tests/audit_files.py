"""Run a `python -m MODULE ...` command and record every file it opens and every class any
unpickler looks up (Python audit events `open` and `pickle.find_class`); written to OUT as JSON.

    python tests/audit_files.py OUT.json jobs.sample RUN
"""
import json
import runpy
import sys

out, module, args = sys.argv[1], sys.argv[2], sys.argv[3:]
opened, unpickled = [], []


def hook(event, event_args):
    if event == "open" and isinstance(event_args[0], str):
        opened.append(event_args[0])
    elif event == "pickle.find_class":
        unpickled.append(f"{event_args[0]}.{event_args[1]}")


sys.addaudithook(hook)
sys.argv = [module, *args]
code = 0
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as e:
    code = e.code or 0
json.dump({"opened": opened, "unpickled": unpickled, "code": code}, open(out, "w"))
