# Guest image for the microVM sandboxes (included by the Makefile).
#   make image [MARATHON_BIN=dist/marathon-dir]   build (or reuse) .cache/image/<hash>/, link .cache/image/current
#                                              (dist/marathon-dir: the one-folder build, fastest to start in a guest;
#                                               dist/marathon, the one-file executable, works too)
#   make image-check                           boot it in QEMU TCG microvm, time boot->agent and snapshot/restore
#   make image-prune                           delete every build but current, and the staging area
IMAGE_CACHE := $(CACHE)/image
IMAGE_PY ?= python3
MARATHON_BIN ?=
IMAGE_HEADROOM_MB ?= 2048
BOOT_CHECK_ARGS ?=

.PHONY: image image-check image-prune image-deps

image-deps:
	@missing=""; for p in debootstrap busybox-static lz4 e2fsprogs qemu-utils qemu-system-x86; do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "missing Debian packages:$$missing (install them with apt-get)"; exit 1; fi; fi

# The image cache lives outside the checkout (default ~/.cache/marathon/image), so a fresh
# clone — CI's — reuses every image already built for the same inputs.
MARATHON_IMAGE_CACHE ?= $(HOME)/.cache/marathon/image

$(IMAGE_CACHE):
	mkdir -p $(CACHE) $(MARATHON_IMAGE_CACHE)
	ln -sfn $(MARATHON_IMAGE_CACHE) $(IMAGE_CACHE)

image: image-deps claude-code | $(IMAGE_CACHE)
	MARATHON_BIN="$(MARATHON_BIN)" IMAGE_HEADROOM_MB="$(IMAGE_HEADROOM_MB)" CLAUDE_BIN="$(abspath $(CLAUDE_BIN))" \
	  $(IMAGE_PY) snapshots/build_image.py

image-check: image
	$(IMAGE_PY) snapshots/boot_check.py --image $(IMAGE_CACHE)/current $(BOOT_CHECK_ARGS)

image-prune:
	@cur=$$(readlink $(IMAGE_CACHE)/current 2>/dev/null); \
	for d in $(IMAGE_CACHE)/*; do n=$${d##*/}; \
	  [ -L "$$d" ] && continue; \
	  case $$n in base|kernel|downloads|"$$cur") ;; *) echo "rm -rf $$d"; rm -rf -- "$$d" ;; esac; done
