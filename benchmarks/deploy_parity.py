"""Deploy files of the parity tests' networks: parity on real images, sizes, latencies.

    python benchmarks/deploy_parity.py [--images 200] [--repeats 200] [--out DIR]

For each network of tests/test_deploy.py (a demo-space winner-like net at 20 px and the zoo's
tiny_teacher at 16 px, both with BatchNorm statistics of real Fashion-MNIST images and a
least-squares classifier: `calibrated_variables`), this writes its deploy files the way the
pipeline's deploy stage does (`export.deploy_network` on a teacher checkpoint, timed), then
prints for each file its size and its agreement with the Flax model on real test images
(max |logit error|, relative to the largest |logit|, top-1 agreement), and the median
latency of the TFLite interpreter at 1 and 2 threads and batch 1 and 8, beside the jitted
Flax model on XLA:CPU (batch 1). The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dna_jax import deploy, export, host_memory, stages, teacher  # noqa: E402
from dna_jax.data import fashion_mnist  # noqa: E402
import test_deploy  # noqa: E402  (tests/: the networks and their weights)


def flax_ms(fn, shape, repeats: int) -> float:
    """Median wall time of the jitted Flax model on this backend, one batch."""
    compiled = jax.jit(fn)
    images = np.zeros(shape, np.float32)
    jax.block_until_ready(compiled(images))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(images))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def measure(name: str, out_dir: str, images: int, repeats: int) -> dict:
    module, size = test_deploy.NETWORKS[name]()
    variables = test_deploy.calibrated_variables(module, size)
    network_dir = os.path.join(out_dir, name, "network")
    teacher.save_teacher(network_dir, name, variables, module.num_classes,
                         preprocessing={"resolution": size}, spec=module.spec,
                         layer_config=module.layer_config, overwrite=True)
    deploy_dir = os.path.join(out_dir, name, "deploy")
    start, cpu = time.perf_counter(), time.process_time()
    content = export.deploy_network(network_dir, deploy_dir, stages.deploy_options(
        _demo_deploy_config()))
    figures = {"deploy_seconds": time.perf_counter() - start,
               "deploy_cpu_seconds": time.process_time() - cpu,
               "resolution": size, "macs": content["network"]["macs"],
               "params": content["network"]["params"], "files": {}}
    test_images, labels = test_deploy.real_images("test", images, size)
    fn = deploy.inference_fn(module, variables)
    reference = np.asarray(jax.jit(fn)(test_images))
    figures["flax_accuracy"] = float(np.mean(reference.argmax(-1) == labels))
    for record in content["files"]:
        data = open(os.path.join(deploy_dir, record["file"]), "rb").read()
        outputs = deploy.run_file(data, record["format"], test_images, 1)
        entry = {"bytes": record["bytes"], **deploy.parity_figures(reference, outputs),
                 "accuracy": float(np.mean(outputs.argmax(-1) == labels))}
        if record["format"] == "tflite":
            quantize = None if record["quantization"] == "float32" else "dynamic"
            for threads in (1, 2):
                entry[f"ms_batch1_threads{threads}"] = deploy.TfliteRunner(
                    data, threads).time_ms(repeats=repeats)
            batch8 = deploy.tflite_bytes(fn, (8, size, size, 3), quantize)
            entry["ms_batch8_threads1"] = deploy.TfliteRunner(batch8, 1).time_ms(
                repeats=max(1, repeats // 4))
        figures["files"][record["file"]] = entry
    figures["flax_xla_ms_batch1"] = flax_ms(fn, (1, size, size, 3), repeats)
    return figures


def _demo_deploy_config():
    from dna_jax import config_files  # pylint: disable=import-outside-toplevel
    return config_files.load_config(os.path.join(ROOT, "configs", "fashion_mnist_dna.py")).deploy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="real test images")
    parser.add_argument("--repeats", type=int, default=200, help="timed invocations")
    parser.add_argument("--out", default="", help="where the files go (default: a temp dir)")
    args = parser.parse_args()
    host_memory.keep_freed_memory()
    out_dir = args.out or tempfile.mkdtemp(prefix="deploy_parity_")
    results = {"machine": deploy.machine(), "images": args.images, "repeats": args.repeats}
    for name in test_deploy.NETWORKS:
        figures = results[name] = measure(name, out_dir, args.images, args.repeats)
        print(f"{name}: {figures['macs']:,} macs, {figures['params']:,} params, "
              f"{figures['resolution']} px; Flax accuracy {figures['flax_accuracy']:.3f} on "
              f"{args.images} test images; deploy files written in "
              f"{figures['deploy_seconds']:.1f} s ({figures['deploy_cpu_seconds']:.1f} s CPU); "
              f"jitted Flax on XLA:CPU {figures['flax_xla_ms_batch1']:.3f} ms")
        for file, entry in figures["files"].items():
            timing = "".join(f"  {key.removeprefix('ms_')} {entry[key]:.3f} ms"
                             for key in entry if key.startswith("ms_"))
            print(f"  {file:<18} {entry['bytes']:>9,} B  max|err| {entry['max_abs_error']:.2g}"
                  f" (rel {entry['relative_error']:.2g} of {entry['logit_scale']:.3g})  "
                  f"top-1 {entry['top1_agreement']:.3f}  acc {entry['accuracy']:.3f}{timing}")
    print(json.dumps(results))


if __name__ == "__main__":
    if not os.path.exists(os.path.join(fashion_mnist.DEFAULT_DIR, "t10k-images-idx3-ubyte.gz")):
        raise SystemExit(f"Fashion-MNIST idx files missing in {fashion_mnist.DEFAULT_DIR}")
    main()
