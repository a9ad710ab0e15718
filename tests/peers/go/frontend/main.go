// kube-apiserver's konnectivity client, played by grpc-go, against our
// proxy-server's /ProxyService/Proxy (h2c on a Unix socket, or mTLS TCP),
// for tests/grpc_go_interop.rs. It dials its own TCP echo destination
// through the tunnel: DIAL_REQ -> DIAL_RSP with a connectID, DATA both ways
// byte-exact, CLOSE_REQ -> CLOSE_RSP; then a refused destination ->
// DIAL_RSP with an error. Prints "OK ..." lines and "PASS", or "FAIL ...".
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"konnwire"
)

var desc = &grpc.StreamDesc{StreamName: "Proxy", ServerStreams: true, ClientStreams: true}

type tunnel struct {
	stream grpc.ClientStream
}

func (t tunnel) send(p konnwire.Packet) {
	b := p.Encode()
	konnwire.Check(t.stream.SendMsg(&b), "send "+p.String())
}

func (t tunnel) recv() konnwire.Packet {
	var b []byte
	konnwire.Check(t.stream.RecvMsg(&b), "recv")
	p, err := konnwire.Decode(b)
	konnwire.Check(err, "decode")
	return p
}

// echoDestination accepts connections and echoes them until EOF.
func echoDestination() string {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	konnwire.Check(err, "listen")
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	return lis.Addr().String()
}

func refusedAddress() string {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	konnwire.Check(err, "listen")
	addr := lis.Addr().String()
	lis.Close()
	return addr
}

func main() {
	target := flag.String("target", "", "unix:///PATH (h2c) or HOST:PORT (mTLS)")
	cert := flag.String("cert", "", "client certificate (mTLS)")
	key := flag.String("key", "", "client key (mTLS)")
	ca := flag.String("ca", "", "CA of the server certificate (mTLS)")
	size := flag.Int("bytes", 1<<20, "bytes each way")
	flag.Parse()
	konnwire.Register()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	creds := grpc.WithInsecure()
	if *cert != "" {
		creds = grpc.WithTransportCredentials(credentials.NewTLS(konnwire.TLSConfig(*cert, *key, *ca, "127.0.0.1", false)))
	}
	conn, err := grpc.DialContext(ctx, *target, creds, grpc.WithBlock())
	konnwire.Check(err, "dial")
	defer conn.Close()

	// One stream per connection, as kube-apiserver does.
	stream, err := conn.NewStream(ctx, desc, "/ProxyService/Proxy")
	konnwire.Check(err, "open Proxy")
	t := tunnel{stream}
	t.send(konnwire.Packet{Type: konnwire.DialReq, Protocol: "tcp", Address: echoDestination(), Random: 4242})
	rsp := t.recv()
	konnwire.Expect(rsp.Type == konnwire.DialRsp && rsp.Random == 4242 && rsp.Error == "" && rsp.ConnectID > 0,
		"dial answer %v", rsp)
	id := rsp.ConnectID
	fmt.Printf("OK DIAL_RSP connectID=%d\n", id)

	payload := konnwire.Pattern(*size, 3)
	sent := make(chan struct{})
	go func() {
		for off := 0; off < len(payload); off += 64 * 1024 {
			end := off + 64*1024
			if end > len(payload) {
				end = len(payload)
			}
			t.send(konnwire.Packet{Type: konnwire.Data, ConnectID: id, Data: payload[off:end]})
		}
		close(sent)
	}()
	var echoed []byte
	for len(echoed) < len(payload) {
		p := t.recv()
		konnwire.Expect(p.Type == konnwire.Data && p.ConnectID == id, "expected DATA, got %v", p)
		echoed = append(echoed, p.Data...)
	}
	<-sent
	konnwire.Expect(bytes.Equal(echoed, payload), "echoed bytes differ")
	fmt.Printf("OK DATA %d bytes each way %s\n", len(payload), konnwire.Hash(payload))

	t.send(konnwire.Packet{Type: konnwire.CloseReq, ConnectID: id})
	for {
		p := t.recv()
		if p.Type == konnwire.Data {
			continue
		}
		konnwire.Expect(p.Type == konnwire.CloseRsp && p.ConnectID == id && p.Error == "", "close answer %v", p)
		break
	}
	fmt.Printf("OK CLOSE_RSP connectID=%d\n", id)
	stream.CloseSend()

	stream, err = conn.NewStream(ctx, desc, "/ProxyService/Proxy")
	konnwire.Check(err, "open Proxy")
	t = tunnel{stream}
	t.send(konnwire.Packet{Type: konnwire.DialReq, Protocol: "tcp", Address: refusedAddress(), Random: -7})
	rsp = t.recv()
	konnwire.Expect(rsp.Type == konnwire.DialRsp && rsp.Random == -7 && rsp.Error != "" && rsp.ConnectID == 0,
		"refused dial answer %v", rsp)
	fmt.Printf("OK refused DIAL_RSP error=%q\n", rsp.Error)
	stream.CloseSend()
	fmt.Println("PASS")
}
