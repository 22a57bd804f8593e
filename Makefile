# xapi-qcow-tool — build, test, benchmark, package.
GO        ?= go
VERSION   ?= $(shell cat VERSION 2>/dev/null || git describe --tags --always 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/xapi-project/xapi-qcow-tool/wrapper.Version=$(VERSION)
BIN       := bin/xapi-qcow-tool
# Static, and with the heap at the start of its first arena: Go 1.26
# randomises where the heap starts inside it, which costs up to 64 MiB of
# address space at random and made imports need 793 MiB of it instead of
# 725 (docs/RELIABILITY.md, "The smallest address-space cap").
GOFLAGS_STATIC := CGO_ENABLED=0 GOEXPERIMENT=norandomizedheapbase64
# Fuzzing is bounded by a count, not a duration: with a duration Go 1.26's
# fuzz coordinator can report "context deadline exceeded" at the deadline
# without any failing input (golang/go#75804, fixed in Go 1.27). A count
# has no deadline. The counts below take about 5 s each here. The
# minimisation is bounded too (see qcow/fuzz_test.go).
# FUZZ_TARGETS: package:target:execs for `make fuzz`; `make fuzz-long
# FUZZTIME=30m` runs every one of them for FUZZTIME instead.
FUZZ_TARGETS ?= \
	./qcow:FuzzParseHeader:200000x \
	./qcow:FuzzReader:100000x \
	./qcow:FuzzReaderAt:20000x \
	./qcow/inspect:FuzzInspectFile:8000x \
	./qcow/inspect:FuzzInspectStream:8000x \
	./vhdcompat/hints:FuzzParseMap:50000x \
	./vhdcompat/hints:FuzzParseInfo:50000x \
	./vhdcompat/hints:FuzzParseLegacy:50000x \
	./vhdcompat/hints:FuzzParseChangedBlocks:50000x \
	./wrapper:FuzzDropinArgs:50000x \
	./vhdcompat/vhd:FuzzNewReader:50000x \
	./vhdcompat/discover:FuzzParseTapCtlLine:100000x \
	./vhdcompat/vhd:FuzzCheck:5000x \
	./vhdcompat/nbd:FuzzClient:50000x
FUZZTIME ?= 10m
FUZZ_PARALLEL ?=

.PHONY: all build demo test unit lint fuzz fuzz-long bench rpm rpm-check clean deps

all: build

build:
	$(GOFLAGS_STATIC) $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/xapi-qcow-tool

deps:
	@bash .ci/deps

# The main job: export a sample disk (64 MiB, three clusters of data) to
# sample.qcow2, and let qemu-img judge it when it is installed.
demo: build
	@rm -f sample.img sample.qcow2
	truncate -s 64M sample.img
	dd if=/dev/urandom of=sample.img bs=64k count=1 seek=0 conv=notrunc status=none
	dd if=/dev/urandom of=sample.img bs=64k count=2 seek=100 conv=notrunc status=none
	$(BIN) stream --source sample.img --destination file://sample.qcow2
	$(BIN) info sample.qcow2 || true
	@if command -v qemu-img >/dev/null; then qemu-img check sample.qcow2 && qemu-img compare -f qcow2 -F raw sample.qcow2 sample.img; fi
	@echo "exported sample.img to sample.qcow2"

lint:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...
	$(GO) mod tidy -diff

unit:
	$(GO) test -race -count=1 -timeout 15m ./...

# Short fuzz runs; the corpus lives in testdata.
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; rest=$${t#*:}; name=$${rest%%:*}; count=$${rest#*:}; \
		echo "fuzz $$pkg $$name $$count"; \
		$(GO) test $$pkg -run '^$$' -fuzz "^$$name\$$" -fuzztime $$count -fuzzminimizetime 500x $(FUZZ_PARALLEL); \
	done

# Long fuzz runs, one target after the other, FUZZTIME each. A run that
# ends with only "context deadline exceeded" and no new testdata/fuzz
# file is golang/go#75804, not a finding.
fuzz-long:
	@for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; rest=$${t#*:}; name=$${rest%%:*}; count=$${rest#*:}; \
		echo "fuzz $$pkg $$name $(FUZZTIME)"; \
		$(GO) test $$pkg -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 500x $(FUZZ_PARALLEL) || status=1; \
	done; exit $${status:-0}

# Everything CI runs.
test: deps lint unit fuzz rpm-check

bench: build
	bash tests/bench/bench.sh

rpm:
	bash packaging/build-rpm.sh

# Builds the RPM, unpacks it and checks paths, fragment, man page, licences
# and the packaged binary (packaging/test-rpm.sh).
rpm-check:
	bash packaging/test-rpm.sh

clean:
	rm -rf bin dist sample.img sample.qcow2
