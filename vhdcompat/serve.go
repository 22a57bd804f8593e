package vhdcompat

import "errors"

// ServeCmd is `serve`: import a qcow2 stream into a raw disk.
// (Being written: see issue 3.)
type ServeCmd struct{}

// Run executes the serve command.
func (c *ServeCmd) Run(env *Env) error { return errors.New("serve: not implemented yet") }
