# Two entry points: `make demo` and `make test`. Both create or reuse .venv and install the project.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision as known-good on the dev/CI machines (a CUDA build; the cap in /etc/xdg/pip agrees).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/install_pillow_simd.sh | sha1sum | cut -c1-12)

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install_pillow_simd.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	bash scripts/install_pillow_simd.sh $(PY)
	@rm -f $(VENV)/.installed-*; touch $@

demo: install
	$(PY) -m dali_bilevel.demo_data --out .demo_data/shapes
	$(PY) launch/imagenet.py --data .demo_data/shapes --output runs/demo \
	  --model cifar_resnet18_w16 --image-size 32 --crop-pct 1 --batch-size 64 --epochs 8 \
	  --lr 0.05 --weight-decay 5e-4 --nesterov --schedule onecycle \
	  --augment learned --transforms affine,color --flip h --val-fraction 0 --loader dali --workers 2 --seed 0
	@$(PY) -c "import json; m = json.load(open('runs/demo/metrics.json')); \
	  print('demo: test accuracy per epoch', [round(e['test_acc'], 1) for e in m['epochs']]); \
	  print('demo: outputs in runs/demo (metrics.json, augmentations_epochNNN.png, augmenter.pt)')"

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf runs/demo .demo_data .pytest_cache .ruff_cache
