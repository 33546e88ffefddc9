"""The AppWorld side of hintsd. Runs with the AppWorld venv's python (`make setup-appworld`), never in the
training process: appworld pins pydantic<2, keeps one world per process and freezes the clock (freezegun) while
a world is open.

    .venv-appworld/bin/python bench/appworld_tasks.py build DIR   # offline tasks -> DIR/data, AppWorld's own format
    .venv-appworld/bin/python bench/appworld_tasks.py serve DIR   # JSON-lines worker for envs.AppWorldEnv

build: a tiny world (one supervisor with a Simple Note account and five notes, the API docs of all apps) in
base_dbs/, then three tasks, each with specs.json, dbs/ (its changes over base_dbs), ground_truth/ (answer, test
data, metadata and a state-based evaluation.py) and the dataset files. Every split lists all three tasks. Made
with the real engine's models, so AppWorld(task_id=...), world.execute and world.evaluate run on them unchanged.

serve: one request per stdin line, one JSON reply per stdout line ({"error": ...} on failure):
    {"cmd": "reset", "task_id", "experiment", "timeout"} -> instruction, supervisor, datetime, apps, docs
    {"cmd": "execute", "code"}                           -> output, completed (world.task_completed())
    {"cmd": "evaluate"}                                  -> success, passes, num_tests, failures
    {"cmd": "close"}                                     -> {} (the world's experiment outputs are removed)
The agent's code runs only inside world.execute (AppWorld's sandboxed IPython shell), in this process.

Importing this module needs only the standard library: TASKS (with ground-truth and wrong solutions) is
shared with the tests.
"""
import json
import os
import shutil
import sys

DATETIME = "2023-05-18T10:00:00"
SUPERVISOR = {"first_name": "Alex", "last_name": "Moreau", "email": "alex.moreau@example.com",
              "phone_number": "5550100200"}
BIRTHDAY, PASSWORD = "1990-04-12", "notes-pass-123"
NOTES = [  # (title, content, tags) of the supervisor's Simple Note notes
    ("Pancake recipe", "Flour, milk, two eggs, a pinch of salt.", ["recipe"]),
    ("Weekly groceries", "Apples, rice, coffee, olive oil.", ["shopping"]),
    ("Tomato soup recipe", "Tomatoes, onion, garlic, stock.", ["recipe", "old"]),
    ("Meeting notes March", "Budget review moved to April.", ["work", "old"]),
    ("Books to read", "Dune; The Left Hand of Darkness.", ["reading"]),
]
LOGIN = """passwords = {a["account_name"]: a["password"] for a in apis.supervisor.show_account_passwords()}
email = apis.supervisor.show_profile()["email"]
token = apis.simple_note.login(username=email, password=passwords["simple_note"])["access_token"]
"""
EVAL_ANSWER = '''import json


def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    with test("the answer is correct"):
        answer = json.loads(models.end.supervisor.Task.all()[0].answer)
        test.answer(answer, ground_truth_answer)
    with test("no app data changed"):
        test.case(models.changed_model_names(), "==", set())
'''
EVAL_CREATE = '''def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    with test("only Simple Note notes changed"):
        test.case(models.changed_model_names(), "==", {"simple_note.Note"})
    with test("exactly one note was added, none updated or removed"):
        added, updated, removed = models.changed_records("simple_note.Note")
        test.case([len(added), len(updated), len(removed)], "==", [1, 0, 0])
    with test("the new note has the requested title, content and tags"):
        note = models.changed_records("simple_note.Note")[0][0]
        test.case(note.title, "==", public_data.title)
        test.case(note.content, "==", public_data.content, normalize_text=True)
        test.case(note.tags, "==", public_data.tags)
'''
EVAL_DELETE = '''def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    with test("only Simple Note notes changed"):
        test.case(models.changed_model_names(), "==", {"simple_note.Note"})
    with test("exactly the notes tagged 'old' were deleted"):
        added, updated, removed = models.changed_records("simple_note.Note")
        test.case(sorted(note.id for note in removed), "==", sorted(private_data.old_note_ids))
        test.case(len(added) + len(updated), "==", 0)
'''
NEW_NOTE = {"title": "Packing list", "content": "passport, charger, sunscreen", "tags": ["travel"]}
TASKS = [
    {"id": "notecount_1", "difficulty": 1, "evaluation": EVAL_ANSWER, "answer": 2,
     "instruction": "How many of my Simple Note notes are tagged 'recipe'?",
     "tests": [("the answer is correct", "no_op_fail"), ("no app data changed", "no_op_pass")],
     "solution": LOGIN + 'notes = apis.simple_note.search_notes(access_token=token, tags=["recipe"], page_limit=20)\n'
                         "apis.supervisor.complete_task(answer=len(notes))",
     "wrong": LOGIN + "apis.supervisor.complete_task(answer=5)"},
    {"id": "notecreate_1", "difficulty": 1, "evaluation": EVAL_CREATE, "answer": None, "public": NEW_NOTE,
     "instruction": "Create a Simple Note note titled 'Packing list' with the content "
                    "'passport, charger, sunscreen' and the tag 'travel'.",
     "tests": [("only Simple Note notes changed", "no_op_fail"),
               ("exactly one note was added, none updated or removed", "no_op_fail"),
               ("the new note has the requested title, content and tags", "no_op_fail")],
     "solution": LOGIN + 'apis.simple_note.create_note(access_token=token, title="Packing list", '
                         'content="passport, charger, sunscreen", tags=["travel"])\napis.supervisor.complete_task()',
     "wrong": LOGIN + 'apis.simple_note.create_note(access_token=token, title="Packing list", content="passport")\n'
                      "apis.supervisor.complete_task()"},
    {"id": "notedelete_1", "difficulty": 2, "evaluation": EVAL_DELETE, "answer": None,
     "instruction": "Delete all of my Simple Note notes that are tagged 'old'.",
     "tests": [("only Simple Note notes changed", "no_op_fail"),
               ("exactly the notes tagged 'old' were deleted", "no_op_fail")],
     "solution": LOGIN + 'for note in apis.simple_note.search_notes(access_token=token, tags=["old"], page_limit=20):\n'
                         '    apis.simple_note.delete_note(access_token=token, note_id=note["note_id"])\n'
                         "apis.supervisor.complete_task()",
     "wrong": LOGIN + 'note = apis.simple_note.search_notes(access_token=token, tags=["old"])[0]\n'
                      'apis.simple_note.delete_note(access_token=token, note_id=note["note_id"])\n'
                      "apis.supervisor.complete_task()"},
]
SPLITS = ("train", "dev", "test_normal", "test_challenge")

# -----------------------------------------------------------------------------
# build


def _write_json(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _build_api_docs(data, canary):
    """data/api_docs/standard/<app>.json (what Task.load reads); returns the docs to fill the api_docs app's DB."""
    from appworld.api_docs import prepare_api_docs
    from appworld.apps import get_all_apps
    docs = {app: prepare_api_docs(app) for app in get_all_apps(skip_admin=True)}
    for app, app_docs in docs.items():
        _write_json({d["api_name"]: {**d, "canary_string": canary} for d in app_docs},
                    f"{data}/api_docs/standard/{app}.json")
    return docs


def _build_base_dbs(data, docs):
    """base_dbs/<app>.db for every app: the API docs, the supervisor (admin + supervisor apps), Simple Note."""
    from appworld.apps import get_all_apps
    from appworld.collections.models import ModelCollection
    base = f"{data}/base_dbs"
    os.makedirs(base)
    m = ModelCollection.load(to_db_home_path=base, from_db_home_path=base, load_apps=get_all_apps(), create_db=True)
    m.api_docs.ApiDoc.save_all([m.api_docs.ApiDoc(app_name_=d["app_name"], **{k: d[k] for k in (
        "api_name", "path", "method", "description", "parameters", "response_schemas")})
        for app_docs in docs.values() for d in app_docs])
    admin = m.admin.MainUser(**SUPERVISOR, birthday=BIRTHDAY)
    admin.save()
    m.admin.AccountPassword(main_user_id=admin.id, account_name="simple_note", password=PASSWORD).save()
    sup = m.supervisor.Supervisor(**SUPERVISOR, birthday=BIRTHDAY)
    sup.save()
    m.supervisor.AccountPassword(supervisor_id=sup.id, account_name="simple_note", password=PASSWORD).save()
    user = m.simple_note.User(first_name=SUPERVISOR["first_name"], last_name=SUPERVISOR["last_name"],
                              email=SUPERVISOR["email"], password=PASSWORD, verified=True)
    user.save()
    note_ids = {}
    for title, content, tags in NOTES:
        note = m.simple_note.Note(user_id=user.id, title=title, content=content, tags=tags)
        note.save()
        note_ids[title] = note.id
    m.close()
    return base, note_ids, sup.id


def _build_task(data, task, base, supervisor_id, private, canary, db_version):
    from appworld.apps import get_all_apps
    from appworld.apps.model_lib import get_db_home_path
    from appworld.collections.models import ModelCollection
    tdir, tid = f"{data}/tasks/{task['id']}", task["id"]
    _write_json({"instruction": task["instruction"], "supervisor": SUPERVISOR, "datetime": DATETIME,
                 "db_version": db_version, "canary_string": canary}, f"{tdir}/specs.json")
    # dbs/: the task's changes over base_dbs (here: the supervisor's active task), as AppWorld saves them
    mem = get_db_home_path(storage_type="memory", type="task_input", task_id=tid)
    m = ModelCollection.load(to_db_home_path=mem, from_db_home_path=base, load_apps=get_all_apps())
    m.supervisor.Task(supervisor_id=supervisor_id, instruction=task["instruction"]).save()
    m.save(f"{tdir}/dbs", format="changes", delete_if_exists=True, save_model_hashes=True)
    m.close()
    gt = f"{tdir}/ground_truth"
    _write_json(task.get("public", {}), f"{gt}/public_data.json")
    _write_json(private, f"{gt}/private_data.json")
    _write_json(task["answer"], f"{gt}/answer.json")
    _write_json([{"requirement": r, "label": label} for r, label in task["tests"]], f"{gt}/test_data.json")
    _write_json({"difficulty": task["difficulty"], "mode": "minimal", "num_apps": 1,
                 "num_apis": task["solution"].count("apis."), "num_api_calls": task["solution"].count("apis."),
                 "num_solution_code_lines": len(task["solution"].splitlines())}, f"{gt}/metadata.json")
    with open(f"{gt}/evaluation.py", "w") as f:
        f.write(f"# Canary String: {canary}\n{task['evaluation']}")


def build(root):
    """Write the offline tasks under root/data (root must not hold a data/ yet)."""
    os.environ["APPWORLD_ROOT"] = root
    data = os.path.join(root, "data")
    if os.path.exists(data):
        raise SystemExit(f"{data} exists; build into an empty AppWorld root")
    from datetime import datetime
    from appworld.apps.api_lib import set_local_date_and_time
    from appworld.common.constants import CANARY_STRING, DB_VERSION
    clock = set_local_date_and_time(datetime.fromisoformat(DATETIME))  # records are created "now", at task time
    base, note_ids, supervisor_id = _build_base_dbs(data, _build_api_docs(data, CANARY_STRING))
    old = [note_ids[title] for title, _, tags in NOTES if "old" in tags]
    for task in TASKS:
        private = {"old_note_ids": old} if task["id"] == "notedelete_1" else {}
        _build_task(data, task, base, supervisor_id, private, CANARY_STRING, DB_VERSION)
    os.makedirs(f"{data}/datasets")
    for split in SPLITS:
        with open(f"{data}/datasets/{split}.txt", "w") as f:
            f.write("".join(t["id"] + "\n" for t in TASKS))
    clock.stop()


# -----------------------------------------------------------------------------
# serve


def _doc_line(app, doc):
    args = ", ".join(p["name"] if p["required"] else f"{p['name']}={p['default']!r}" for p in doc["parameters"])
    return f"apis.{app}.{doc['api_name']}({args}): {doc['description']}"


class Worker:
    def __init__(self, root):
        self.root, self.world, self.experiment = root, None, None

    def reset(self, task_id, experiment, timeout=100):
        from appworld import AppWorld
        self.close()
        self.world = AppWorld(task_id=task_id, experiment_name=experiment, timeout_seconds=timeout)
        self.experiment = experiment
        task = self.world.task
        docs = [_doc_line(app, d) for app in ("api_docs", "supervisor") for d in task.api_docs[app].values()]
        return {"instruction": task.instruction, "supervisor": dict(task.supervisor), "datetime": str(task.datetime),
                "apps": dict(task.app_descriptions), "docs": docs}

    def execute(self, code):
        output = self.world.execute(code)
        return {"output": output, "completed": bool(self.world.task_completed())}

    def evaluate(self):
        t = self.world.evaluate()
        return {"success": bool(t.success), "passes": t.pass_count, "num_tests": t.num_tests,
                "failures": [{"requirement": f["requirement"], "trace": f["trace"][-1000:]} for f in t.failures]}

    def close(self):
        if self.world is not None:
            self.world.close()
            shutil.rmtree(os.path.join(self.root, "experiments", "outputs", self.experiment), ignore_errors=True)
        self.world = None
        return {}


def serve(root):
    os.environ["APPWORLD_ROOT"] = root
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies only; anything else printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker(root)
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req.pop("cmd")
        try:
            reply = getattr(worker, cmd)(**req) if cmd in ("reset", "execute", "evaluate", "close") else \
                {"error": f"unknown command {cmd!r}"}
        except BaseException as e:  # noqa: BLE001 -- report everything, the parent decides
            reply = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(reply, default=str) + "\n")
        if cmd == "close":
            break
    worker.close()
    proto.flush()
    os._exit(0)  # a normal interpreter exit takes seconds here (IPython, sqlite, appworld teardown)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("build", "serve"):
        raise SystemExit(__doc__)
    {"build": build, "serve": serve}[sys.argv[1]](os.path.abspath(sys.argv[2]))
