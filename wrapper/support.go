package wrapper

import (
	"errors"

	"github.com/xapi-project/xapi-qcow-tool/vhdcompat"
)

// Support commands: info, map, check, compare, completion.
// (Being written: see issue 5.)

type InfoCmd struct{}

func (c *InfoCmd) Run(env *vhdcompat.Env) error { return errors.New("info: not implemented yet") }

type MapCmd struct{}

func (c *MapCmd) Run(env *vhdcompat.Env) error { return errors.New("map: not implemented yet") }

type CheckCmd struct{}

func (c *CheckCmd) Run(env *vhdcompat.Env) error { return errors.New("check: not implemented yet") }

type CompareCmd struct{}

func (c *CompareCmd) Run(env *vhdcompat.Env) error { return errors.New("compare: not implemented yet") }

type CompletionCmd struct{}

func (c *CompletionCmd) Run(env *vhdcompat.Env) error {
	return errors.New("completion: not implemented yet")
}
