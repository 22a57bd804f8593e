package vhdcompat

import "fmt"

// flagValue is a vhd-tool flag of which this tool supports one value.
type flagValue struct {
	flag, got, want string
	supported       string // what the refusal lists as supported
}

// onlySupported refuses the first flag whose value is not the supported
// one, in the words stream and serve use alike.
func onlySupported(flags ...flagValue) error {
	for _, f := range flags {
		if f.got != f.want {
			return &UsageError{fmt.Sprintf("%s %s is not supported (supported: %s)", f.flag, f.got, f.supported)}
		}
	}
	return nil
}
