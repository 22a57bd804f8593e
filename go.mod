module github.com/xapi-project/xapi-qcow-tool

go 1.26.0

require (
	github.com/alecthomas/kong v1.17.0
	github.com/coreos/go-systemd/v22 v22.7.0
	github.com/klauspost/compress v1.20.4
	golang.org/x/sys v0.50.0
)
