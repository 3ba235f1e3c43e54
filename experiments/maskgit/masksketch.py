"""MaskSketch on the built-in shapes: does structure-guided sampling follow a guide image's layout?

    python experiments/maskgit/masksketch.py            # after experiments/maskgit/reproduce.py trained its runs

For `--guides` validation images (the guides), a trained MaskGIT samples one image per guide, of the guide's
class, with the guide's self-attention maps as the structure target (`MaskGITTask.sample(structure_guide=...)`)
at several structure weights and attention blocks (weight 0 = unguided sampling, the baseline). Structure is scored on object silhouettes:
the built-in set draws things bright and stuff dark in every channel (things >= 140, stuff <= 120 of 255), so a
pixel is "object" when its darkest channel exceeds 130. Reported per weight: the IoU of the sample's silhouette
with the guide's true object mask (the data set's `semantic` thing pixels), the share of samples the classifier
gives the guide's class, and two references: the guide's own tokenizer reconstruction (the best a sample of these
tokens can do) and another real image of the same class (what matching the class alone gives).
Writes experiments/results/maskgit_masksketch.{md,json} and experiments/results/maskgit_masksketch.png (rows:
guide, reconstruction, unguided, guided at each weight).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from reproduce import Scorer, load_task  # noqa: E402

RESULTS = os.path.join(ROOT, "experiments", "results")
THRESHOLD = 130.0 / 127.5 - 1.0  # 130 of 255 in maskjax's [-1, 1] pixel range


def silhouettes(images):
    import numpy as np
    return np.asarray(images, np.float32).min(axis=-1) > THRESHOLD


def iou(a, b):
    import numpy as np
    inter = np.logical_and(a, b).sum(axis=(1, 2))
    union = np.logical_or(a, b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdirs", default=os.path.join(ROOT, "workdirs", "maskgit_repro"))
    p.add_argument("--guides", type=int, default=200)
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 10.0, 100.0, 1000.0],
                   help="structure weights lambda_s (0 = unguided sampling)")
    p.add_argument("--layers", type=int, nargs="+", default=[-1, 0], help="blocks whose attention maps guide")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--results-name", default="maskgit_masksketch")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from maskjax.data.builtin import NUM_STUFF, BuiltinShapes
    from maskjax.tasks.tokenizer import image_grid

    started = time.time()
    task, params = load_task(os.path.join(args.workdirs, "maskgit"))
    scorer = Scorer(os.path.join(args.workdirs, "classifier"), count=250)
    data = BuiltinShapes("validation", image_size=32).get_batch(range(2 * args.guides))
    images = data["image"].astype(np.float32) / 127.5 - 1.0
    truth = data["semantic"] >= NUM_STUFF
    labels = data["label"].astype(np.int32)
    guide_images, guide_truth, guide_labels = images[:args.guides], truth[:args.guides], labels[:args.guides]
    # The same-class reference: for each guide, the first other image of its class among the second half.
    pool = np.arange(args.guides, 2 * args.guides)
    partner = np.array([pool[labels[pool] == lab][0] if (labels[pool] == lab).any() else pool[0]
                        for lab in guide_labels])

    tokenize = jax.jit(task.tokenize)
    detokenize = jax.jit(task.detokenize)
    guide_tokens = np.concatenate([np.asarray(tokenize(jnp.asarray(guide_images[s:s + args.batch])))
                                   for s in range(0, args.guides, args.batch)])
    reconstructions = np.concatenate([np.asarray(detokenize(jnp.asarray(guide_tokens[s:s + args.batch])))
                                      for s in range(0, args.guides, args.batch)])

    def classify(batch_images):
        return np.concatenate([scorer.features(jnp.asarray(batch_images[s:s + 250]))[1].argmax(-1)
                               for s in range(0, len(batch_images), 250)])

    rows = {"reconstruction of the guide": (iou(silhouettes(reconstructions), guide_truth),
                                            classify(reconstructions) == guide_labels),
            "another real image of the class": (iou(truth[partner], guide_truth),
                                                classify(images[partner]) == guide_labels)}
    samples = {}
    settings = [(0.0, None)] + [(w, layer) for layer in args.layers for w in args.weights if w > 0]
    for weight, layer in settings:
        def draw(p, lab, guide, key, weight=weight, layer=layer):
            extra = {} if weight == 0 else {"structure_guide": guide, "structure_weight": weight,
                                            "structure_layer": layer}
            tokens = task.sample(p, lab, key, num_steps=args.steps, **extra)[0]
            return task.detokenize(tokens)
        fn = jax.jit(draw)
        out = [np.asarray(fn(params, jnp.asarray(guide_labels[s:s + args.batch]),
                             jnp.asarray(guide_tokens[s:s + args.batch]), jax.random.fold_in(jax.random.key(0), s)))
               for s in range(0, args.guides, args.batch)]
        name = "unguided (weight 0)" if weight == 0 else \
            f"structure-guided, block {layer % task.model.depth}, weight {weight:g}"
        samples[name] = np.concatenate(out)
        rows[name] = (iou(silhouettes(samples[name]), guide_truth), classify(samples[name]) == guide_labels)
        print(f"{name}: IoU {rows[name][0].mean():.3f}, class accuracy {rows[name][1].mean():.3f}", flush=True)

    show = 8
    grid = [guide_images[:show], reconstructions[:show]] + [v[:show] for v in samples.values()]
    os.makedirs(RESULTS, exist_ok=True)
    Image.fromarray(image_grid(grid, upscale=3)).save(os.path.join(RESULTS, f"{args.results_name}.png"))

    command = "python experiments/maskgit/masksketch.py" + "".join(
        f" {a}" for a in sys.argv[1:])
    table = {name: {"silhouette_iou": float(v[0].mean()), "silhouette_iou_sem": float(v[0].std() / np.sqrt(len(v[0]))),
                    "class_accuracy": float(v[1].mean())} for name, v in rows.items()}
    record = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "guides": args.guides, "decode_steps": args.steps, "weights": args.weights, "layers": args.layers,
              "maskgit_workdir": os.path.join(args.workdirs, "maskgit"), "seconds": round(time.time() - started),
              "rows": table}
    with open(os.path.join(RESULTS, f"{args.results_name}.json"), "w") as f:
        json.dump(record, f, indent=2)
    lines = [f"# MaskSketch on the built-in shapes: structure-guided sampling", "",
             f"Command: `{command}` ({record['date']}, {record['seconds']} s).", "",
             f"{args.guides} validation images serve as guides; one sample per guide, of the guide's class, "
             f"{args.steps} decoding steps (cosine, choice temperature 4.5), the MaskGIT of "
             "`experiments/maskgit/reproduce.py`; guided sampling starts from the guide's tokens and re-masks "
             "by confidence minus weight x attention-map distance (`maskjax.decode.structure_guided_decode`). "
             "Silhouette IoU: the sample's "
             "object pixels (darkest channel > 130 of 255) against the guide's true object mask (mean, +- standard "
             "error). Class accuracy: the classifier of the sample metrics gives the guide's class.", "",
             "| samples | silhouette IoU with the guide | class accuracy |", "|---|---|---|"]
    for name, v in table.items():
        lines.append(f"| {name} | {v['silhouette_iou']:.3f} +- {v['silhouette_iou_sem']:.3f} | "
                     f"{v['class_accuracy']:.3f} |")
    lines += ["", f"`{args.results_name}.png`: rows = guide, its reconstruction, then the samples of each row of "
              "the table from 'unguided' down."]
    with open(os.path.join(RESULTS, f"{args.results_name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
