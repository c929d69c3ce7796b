# Device call 1: classifier (background) + VAE stage + first UNet chunk. Run from the repo root.
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 ACCEL_CIFAR10_DIR=$PWD/.data TQDM_MININTERVAL=5
W=/tmp/work; mkdir -p $W
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, diffusers, transformers, accelerate; print(torch.__version__, diffusers.__version__, transformers.__version__, accelerate.__version__)"
python3 -m apps.train_classifier --out $W/classifier --epochs 40 > $OUT/classifier.log 2>&1 &
CPID=$!
python3 -m apps.train_embedded --stage vae --out $W/emb --max-steps 5000 --time-budget 140 > $OUT/vae.log 2>&1
tail -c 600 $OUT/vae.log
LEFT=$(( 600 - ($(date +%s) - T0) - 75 ))
echo "unet time budget $LEFT s"
python3 -m apps.train_embedded --stage unet --out $W/emb --max-steps 100000 --time-budget $LEFT --checkpoint-every 1000000 > $OUT/unet.log 2>&1
tail -c 600 $OUT/unet.log
wait $CPID
tail -c 400 $OUT/classifier.log
cd $W && tar cf - classifier/model.safetensors classifier/config.json emb/vae_result.json emb/unet_result.json emb/pipeline | split -b 15M - $OUT/call1.tar.part-
ls -la $OUT; echo "total $(( $(date +%s) - T0 )) s"
