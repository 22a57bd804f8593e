package vhd_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/xapi-project/xapi-qcow-tool/tests/vhdtest"
	"github.com/xapi-project/xapi-qcow-tool/vhdcompat/vhd"
)

// Example lists the sectors a differencing VHD stores and names its parent.
func Example() {
	dir, _ := os.MkdirTemp("", "vhd-example")
	defer os.RemoveAll(dir)
	child := vhdtest.Child(vhdtest.New(8<<20), "parent.vhd")
	child.Write(3<<20, make([]byte, 64<<10))
	path := filepath.Join(dir, "child.vhd")
	if err := child.Save(path); err != nil {
		log.Fatal(err)
	}

	f, err := os.Open(path)
	if err != nil {
		log.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	v, err := vhd.NewReader(f, fi.Size())
	if err != nil {
		log.Fatal(err)
	}
	parents := v.ParentPaths()
	fmt.Println(v.Footer.DiskType, v.VirtualSize(), parents[0])
	_ = v.Extents(func(e vhd.Extent) error {
		if e.Stored {
			fmt.Printf("stored [%#x, %#x)\n", e.Start, e.Start+e.Length)
		}
		return nil
	})
	// Output:
	// differencing 8388608 ./parent.vhd
	// stored [0x300000, 0x310000)
}
