"""Fine-tune Qwen-Image with a LoRA: the whole loop, in one readable script over diffusmith's parts.

`diffusmith train` runs these same parts (plus resume, validation, logs and multi-GPU); copy this file
when you want to change the loop itself.

    python examples/qwen_image/train.py --model Qwen/Qwen-Image --dataset my_pictures/ --output my_lora/
"""

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from diffusmith import QwenImagePipeline
from diffusmith.training.checkpoint import save_checkpoint
from diffusmith.training.data import load_dataset, make_dataloader
from diffusmith.training.module import LossSpec, TrainableSpec, TrainingModule
from diffusmith.training.optim import make_lr_scheduler, make_optimizer
from diffusmith.training.outputs import save_final_weights


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--size", type=int, default=1024, help="train at size x size pixels")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    out = Path(args.output)
    torch.manual_seed(0)

    # 1. the inference pipeline, and the data it will be fed
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = QwenImagePipeline.from_pretrained(args.model, device=args.device, torch_dtype=dtype)
    dataset = load_dataset(args.dataset, height=args.size, width=args.size)
    loader = make_dataloader(dataset, batch_size=1, seed=0)

    # 2. what trains: a LoRA on the DiT; the loss runs the pipeline's own units in training mode
    module = TrainingModule(pipe, TrainableSpec(rank=args.rank), LossSpec(use_gradient_checkpointing=True))
    optimizer = make_optimizer(module.trainable_parameters().values(), args.learning_rate)
    lr_scheduler = make_lr_scheduler(optimizer, "constant", warmup_steps=0, total_steps=args.steps)

    # 3. the loop
    step, epoch = 0, 0
    with tqdm(total=args.steps) as progress:
        while step < args.steps:
            loader.batch_sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            for batch in loader:
                with torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = module(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(module.trainable_parameters().values(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
                if step % args.save_every == 0:
                    save_checkpoint(out, step, trainable=module.trainable_state_dict(), optimizer=optimizer,
                                    lr_scheduler=lr_scheduler, epoch=epoch,
                                    data_state=loader.batch_sampler.state_dict())
                if step == args.steps:
                    break
            epoch += 1

    # 4. the result: a LoRA file diffusers, ComfyUI and `diffusmith generate --lora` load
    print("saved", save_final_weights(out, module))


if __name__ == "__main__":
    main()
