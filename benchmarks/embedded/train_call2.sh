# Device call: continue the UNet stage from a carried pipeline, export, then the full evaluation sweep.
# Usage: bash benchmarks/embedded/train_call2.sh SEED   (run from the repo root)
# init.tar.xz: the call-1 pipeline and classifier (the output of train_call1.sh), packed into out/device/ (git-ignored) before this call.
T0=$(date +%s); SEED=${1:-1}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ACCEL_CIFAR10_DIR=$PWD/.data TQDM_MININTERVAL=10
W=/tmp/work; mkdir -p $W/init $W/emb && tar xJf out/device/init.tar.xz -C $W/init || exit 1
cp -r $W/init/emb/pipeline/vae $W/emb/vae
LEFT=$(( 600 - ($(date +%s) - T0) - 170 ))
echo "unet time budget $LEFT s"
python3 -m apps.train_embedded --stage unet --out $W/emb --init-from $W/init/emb/pipeline --seed $SEED --compile --max-steps 100000 --time-budget $LEFT --checkpoint-every 1000000 > $OUT/unet.log 2>&1
grep -a -e "compile" -e "Error" $OUT/unet.log | head -5; tail -c 400 $OUT/unet.log
cd $W && tar cf - emb/unet_result.json emb/pipeline | split -b 15M - $OUT/pipe.tar.part- ; cd - >/dev/null
for G in 2 3 4 6; do
  python3 -m accel.quality.evaluate --model $W/emb/pipeline --classifier $W/init/classifier --n 1000 --steps 20 --guidance-scale $G --batch-size 250 --device cuda --out $W/eval/g$G 2>&1 | grep -a -e "^|" -e Frechet -e Error
done
rm -rf accel/models/mini-sd-cifar10 && cp -r $W/emb/pipeline accel/models/mini-sd-cifar10
for T in 2; do S=$(date +%s.%N); CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=$T python3 -c "
import torch; from accel.embedded import load_embedded_pipeline
pipe = load_embedded_pipeline('cpu'); pipe('a photo of a horse', num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0].save('/tmp/horse.png')" 2>&1 | grep -a Error; echo "cpu generate end-to-end, $T threads: $S $(date +%s.%N)"; done
cd $W && tar cf $OUT/eval.tar eval; ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
