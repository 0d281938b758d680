"""Shows that each reliability test guards its protection: breaks one protection at a time in a copy of the tree and
runs the test that should catch it. Not collected by pytest; run ``python tests/reliability/mutation_check.py``
(about 10 minutes on 2 cores; ``... mutation_check.py WORD ...`` runs only the mutations whose description holds a
WORD). Prints CAUGHT (the tests fail, as they must) or NOT CAUGHT per mutation."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
T = "tests/reliability/"

# (what is broken, file, original text, broken text, pytest arguments)
MUTATIONS = [
    ("checkpoint files written in place instead of temp file + rename", "segrank/files.py",
     "        write(Path(tmp))\n", "        write(path)\n        return\n", T + "test_kill_resume.py"),
    ("outputs keep mkstemp's 0600 whatever the umask", "segrank/files.py",
     "        os.chmod(tmp, 0o666 & ~current_umask())\n", "", T + "test_file_modes.py"),
    ("'latest' pointer renamed into place before the optimizer state is written", "segrank/engine/state.py",
     '    files.atomic_write(folder / f"{name}.state.pt", lambda tmp: torch.save(state, tmp))\n'
     '    files.atomic_write(folder / LATEST, lambda tmp: tmp.write_text(name + "\\n"))',
     '    files.atomic_write(folder / LATEST, lambda tmp: tmp.write_text(name + "\\n"))\n'
     '    files.atomic_write(folder / f"{name}.state.pt", lambda tmp: torch.save(state, tmp))',
     T + "test_kill_resume.py"),
    ("second signal no longer exits at once", "segrank/engine/runtime.py", "            os._exit(128 + signum)",
     "            pass", T + "test_stop_and_nonfinite.py -k second"),
    ("non-finite loss not stopped", "segrank/engine/train.py", '                if tc.nonfinite == "stop":',
     "                if False:", T + "test_stop_and_nonfinite.py -k stops"),
    ("no vocabulary check of label files", "segrank/data/datasets.py", "        if outside.any():", "        if False:",
     T + "test_bad_input.py -k vocabulary"),
    ("DataLoader worker errors printed with their traceback", "segrank/cli.py", '    if text.startswith("Caught ")',
     "    if False", T + "test_bad_input.py -k truncated_jpeg"),
    ("work dir written before the data is checked", "segrank/engine/train.py",
     "    torch.manual_seed(tc.seed)\n    model = Segmentor(cfg.model)",
     "    if env.main:\n        state.prepare_work_dir(work_dir, cfg, resume)\n    torch.manual_seed(tc.seed)\n"
     "    model = Segmentor(cfg.model)", T + "test_bad_input.py -k without_label"),
    ("no disk-space check", "segrank/engine/state.py", "    if free < 1.1 * need:", "    if False:",
     T + "test_bad_input.py -k disk"),
    ("no crop-size check", "segrank/engine/train.py", "    if any(c > r for c, r in zip(sorted(cfg.data.crop_size)",
     "    if False and any(c > r for c, r in zip(sorted(cfg.data.crop_size)", T + "test_bad_input.py -k crop"),
    ("pickles loaded with weights_only=False", "segrank/files.py",
     'torch.load(f, map_location="cpu", weights_only=True)',
     'torch.load(f, map_location="cpu", weights_only=False)', T + "test_no_code_execution.py"),
    ("checkpoint format chosen by the file name", "segrank/checkpoints/detect.py",
     '    if head[8:9] == b"{" and length < MAX_SAFETENSORS_HEADER:', '    if path.suffix == ".safetensors":',
     "tests/models/test_checkpoints.py -k told_apart"),
    ("torch.load given the path (it picks a reader by the name)", "segrank/files.py",
     'torch.load(f, map_location="cpu", weights_only=True)', 'torch.load(path, map_location="cpu", weights_only=True)',
     "tests/models/test_checkpoints.py -k told_apart"),
    ("a training state taken for weights", "segrank/checkpoints/detect.py",
     "    if obj.keys() >= TRAINING_STATE_KEYS:", "    if False:", T + "test_bad_input.py -k training_state"),
    ("predict ignores the settings a checkpoint carries", "segrank/engine/settings.py",
     "    if model.inference is not None:\n        sources.append(model.inference)",
     "    if False:\n        sources.append(model.inference)", "tests/engine/test_self_contained.py -k alone"),
    ("images read without their EXIF orientation", "segrank/engine/images.py",
     "    img = ImageOps.exif_transpose(img)", "    img = img", "tests/engine/test_predictor.py -k viewer"),
    ("a broken upload not answered 400", "segrank/engine/serve.py", "        except IMAGE_ERRORS as err:",
     "        except () as err:", "tests/engine/test_serve.py -k concurrent"),
    ("config YAML loaded unsafely", "segrank/files.py", "yaml.safe_load(Path(path).read_text())",
     "yaml.unsafe_load(Path(path).read_text())", T + "test_no_code_execution.py -k config_yaml"),
    ("config values not checked against their declared bounds", "segrank/config/fields.py",
     "        problems = field_problems(self)\n", "        problems = []\n",
     T + "test_bad_input.py -k batch_size_zero"),
    ("rules between config keys not checked", "segrank/config/fields.py", "        for rule in self.rules:",
     "        for rule in ():", T + "test_bad_input.py -k divisible_by"),
    ("empty config file taken as all defaults", "segrank/config/build.py", "    if data is None or data == {}:",
     "    data = data or {}\n    if False:", T + "test_bad_input.py -k empty_config"),
    ("variant.yml loaded unsafely", "segrank/checkpoints/segmenter.py", "class _VariantLoader(yaml.SafeLoader)",
     "class _VariantLoader(yaml.UnsafeLoader)", T + "test_no_code_execution.py -k variant"),
    ("mmseg config text executed", "segrank/checkpoints/mmseg.py", "        tree = ast.parse(text)",
     "        exec(text, {})\n        tree = ast.parse(text)", T + "test_no_code_execution.py -k mmseg_config"),
    ("flip moves the image but not the label", "segrank/data/transforms.py",
     "return img[:, ::-1].copy(), label[:, ::-1].copy()", "return img[:, ::-1].copy(), label.copy()",
     T + "test_fuzz.py -k aligned"),
    ("data order not seeded", "segrank/engine/sampling.py",
     "generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 1))",
     "generator = torch.Generator()\n            generator.seed()", T + "test_determinism.py"),
    ("a restarted torchrun job refuses its own work dir", "segrank/engine/train.py",
     "    continued = agree(env, not resume and continues_job(state.launched_by(work_dir)))",
     "    continued = False", T + "test_distributed.py -k later_start"),
    ("a repeated SIGTERM under torchrun abandons the checkpoint", "segrank/engine/runtime.py",
     "            if launch_id() is None:\n                os._exit(128 + signum)",
     "            os._exit(128 + signum)", T + "test_distributed.py -k repeated"),
    ("temp files of killed converter writes left in the output", "segrank/data/convert/__init__.py",
     "        files.remove_temps(Path(dst))", "        pass", "tests/data/test_prepare_parallel.py -k temp"),
    # Outputs checked before the work starts, and kept when the final write fails.
    ("no write-permission check of destinations", "segrank/files.py",
     "    if not os.access(existing, os.W_OK | os.X_OK):", "    if False:", T + "test_bad_input.py -k read_only"),
    ("a file destination that is a folder accepted", "segrank/files.py", "    if not folder and path.is_dir():",
     "    if False:", T + "test_bad_input.py -k eval_out_is_a_folder"),
    ("eval outputs checked only when written, after the evaluation", "segrank/commands.py",
     "    ensure_outputs_writable(out)  # before", "    pass  # before", T + "test_bad_input.py -k eval_chart"),
    ("predict output folder not checked first", "segrank/commands.py", "    files.ensure_writable(out, folder=True)\n",
     "", T + "test_bad_input.py -k predict_out_in_read_only"),
    ("convert destination not checked first", "segrank/commands.py",
     "    files.ensure_writable(out, folder=folder)\n", "", T + "test_bad_input.py -k convert_out_in_read_only"),
    ("ONNX export destination not checked first", "segrank/commands.py",
     "    files.ensure_writable(out)  # a folder, or", "    pass  # a folder, or",
     T + "test_bad_input.py -k export_out_in_read_only"),
    ("train work dir not checked first", "segrank/engine/train.py",
     "    files.ensure_writable(work_dir, folder=True)\n", "", T + "test_bad_input.py -k train_work_dir_in_read_only"),
    ("eval results lost when the final write fails", "segrank/engine/eval_outputs.py",
     "            _write_all(output_paths(kept / Path(out).name), results, hist, class_names)", "            pass",
     "tests/engine/test_eval_outputs.py -k failed_final_write"),
    # Command-line flags.
    ("argparse errors printed with the usage block", "segrank/cli.py", "        raise UsageError(self.prog, message)",
     "        super().error(message)", T + "test_bad_input.py -k predict_without_out"),
    ("unknown flags reported by argparse's top-level parser", "segrank/cli.py",
     "args, unknown = parser.parse_known_args(argv)", "args, unknown = parser.parse_args(argv), []",
     T + "test_bad_input.py -k unknown_flag"),
    ("errors of nested commands named by their group only", "segrank/cli.py",
     'getattr(args, f"{args.command}_action", None)', "None", T + "test_bad_input.py -k prepare_dst"),
    ("std 0 accepted", "segrank/cli.py", "positive_float = number(float, 0, above=True)",
     "positive_float = number(float)", T + "test_bad_input.py -k std_zero"),
    ("NaN accepted as a flag value", "segrank/cli.py", "        if not math.isfinite(value):", "        if False:",
     T + "test_bad_input.py -k mean_nan"),
    ("eval ignores --set model.* silently", "segrank/commands.py",
     "        check_model_overrides(args.set, cfg.model, model.cfg)", "        pass",
     T + "test_bad_input.py -k eval_set_model"),
    # Distributed runs.
    ("every torchrun rank reports", "segrank/commands.py", 'if not result["stopped"] and result["rank"] == 0:',
     'if not result["stopped"]:', "tests/engine/test_train.py -k two_process"),
    ("token-table gradients keep the sequence's strides (DDP warns)", "segrank/models/segmentor.py",
     "                param.register_hook(standard_layout)", "                pass",
     "tests/engine/test_train.py -k two_process"),
]


def main(words: list[str]) -> int:
    missed = 0
    chosen = [m for m in MUTATIONS if not words or any(w in m[0] for w in words)]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "work_dirs", "demo_output"))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(copy)}
        for what, path, original, broken, tests in chosen:
            file = copy / path
            source = file.read_text()
            if source.count(original) != 1:
                print(f"STALE  {what}: the original text is no longer in {path}")
                missed += 1
                continue
            file.write_text(source.replace(original, broken))
            try:
                run = subprocess.run(f"{sys.executable} -m pytest -q -x -p no:cacheprovider {tests}", shell=True,
                                     cwd=copy, env=env, capture_output=True, text=True)
            finally:
                file.write_text(source)
            caught = run.returncode != 0
            missed += not caught
            print(f"{'CAUGHT' if caught else 'NOT CAUGHT'}  {what}  ({tests})", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
