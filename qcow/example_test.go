package qcow_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"

	"github.com/xapi-project/xapi-qcow-tool/qcow"
	"github.com/xapi-project/xapi-qcow-tool/qcow/bitmap"
)

// A 1 MiB disk in 64 KiB clusters whose clusters 0 and 5 hold data is
// written front to back: the metadata, then each stored cluster in guest
// order. The output never seeks, so it may be a pipe.
func ExampleNewWriter() {
	const clusterBits = 16
	data := bitmap.New(16)
	data.Set(0)
	data.Set(5)
	var out bytes.Buffer
	w, err := qcow.NewWriter(&out, qcow.Allocation{
		VirtualSize: 1 << 20, ClusterBits: clusterBits, RefcountOrder: 4, Data: data,
	})
	if err != nil {
		log.Fatal(err)
	}
	if err := w.WriteMetadata(); err != nil {
		log.Fatal(err)
	}
	for _, fill := range []byte{'a', 'f'} { // clusters 0 and 5
		if _, err := w.Write(bytes.Repeat([]byte{fill}, 1<<clusterBits)); err != nil {
			log.Fatal(err)
		}
	}
	if err := w.Close(); err != nil {
		log.Fatal(err)
	}
	fmt.Println("data clusters:", w.Layout().DataClusters)
	fmt.Println("image bytes:", out.Len() == int(w.Layout().Size()))
	// Output:
	// data clusters: 2
	// image bytes: true
}

// An image read as a stream, front to back, comes out as extents of the
// guest disk that cover it exactly once, in stream order: what the tables
// say reads as zero comes out as the tables pass, the data as it arrives.
func ExampleNewReader() {
	data := bitmap.New(16)
	data.Set(5)
	var img bytes.Buffer
	w, err := qcow.NewWriter(&img, qcow.Allocation{VirtualSize: 1 << 20, ClusterBits: 16, RefcountOrder: 4, Data: data})
	if err != nil {
		log.Fatal(err)
	}
	if err := w.WriteMetadata(); err != nil {
		log.Fatal(err)
	}
	w.Write(bytes.Repeat([]byte{'f'}, 1<<16))
	if err := w.Close(); err != nil {
		log.Fatal(err)
	}

	r, err := qcow.NewReader(&img, qcow.ReaderOptions{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("virtual size:", r.Header().Size)
	for {
		e, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("%#x+%#x %v\n", e.Offset, e.Length, e.Kind)
	}
	// Output:
	// virtual size: 1048576
	// 0x0+0x50000 unallocated
	// 0x60000+0xa0000 unallocated
	// 0x50000+0x10000 data
}
