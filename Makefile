# xapi-qcow-tool — build, test, benchmark, package.
GO        ?= go
VERSION   ?= $(shell cat VERSION 2>/dev/null || git describe --tags --always 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/xapi-project/xapi-qcow-tool/wrapper.Version=$(VERSION)
BIN       := bin/xapi-qcow-tool
GOFLAGS_STATIC := CGO_ENABLED=0
# Fuzzing is bounded by a count, not a duration: with a duration Go 1.26's
# fuzz coordinator can report "context deadline exceeded" at the deadline
# without any failing input (golang/go#75804, fixed in Go 1.27). A count
# has no deadline. The qcow counts take about 10 s here, the VHD one 5 s. FuzzReader's
# minimisation is bounded too (see qcow/fuzz_test.go).
FUZZ_HEADER_EXECS ?= 200000x
FUZZ_READER_EXECS ?= 100000x
FUZZ_VHD_EXECS    ?= 50000x

.PHONY: all build demo test unit lint fuzz bench rpm rpm-check clean deps

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
	$(GO) test ./qcow -run '^$$' -fuzz '^FuzzParseHeader$$' -fuzztime $(FUZZ_HEADER_EXECS)
	$(GO) test ./qcow -run '^$$' -fuzz '^FuzzReader$$' -fuzztime $(FUZZ_READER_EXECS) -fuzzminimizetime 500x
	$(GO) test ./vhdcompat/vhd -run '^$$' -fuzz '^FuzzNewReader$$' -fuzztime $(FUZZ_VHD_EXECS) -fuzzminimizetime 500x

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
