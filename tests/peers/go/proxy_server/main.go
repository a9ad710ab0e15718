// Upstream's proxy-server agent port, played by grpc-go, against our
// proxy-agent, for tests/grpc_go_interop.rs: /AgentService/Connect over TLS
// with client certificates required, serverid/servercount sent as response
// headers. On the first agent stream it drives DIAL_REQ, DATA, CLOSE_REQ,
// unknown connectIDs, a destination that closes, a refused dial and
// DIAL_CLS, checking every answer; then prints "AWAIT_DRAIN" and waits for
// the DRAIN our agent sends on SIGTERM. Prints "OK ..." lines and "PASS",
// or "FAIL ..." and exits 1.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"konnwire"
)

type agentStream struct {
	stream  grpc.ServerStream
	packets chan konnwire.Packet
}

func (a agentStream) send(p konnwire.Packet) {
	b := p.Encode()
	konnwire.Check(a.stream.SendMsg(&b), "send "+p.String())
}

// next returns the next packet that is not skipped, within a deadline.
func (a agentStream) next(what string, skip func(konnwire.Packet) bool) konnwire.Packet {
	deadline := time.After(20 * time.Second)
	for {
		select {
		case p, ok := <-a.packets:
			konnwire.Expect(ok, "agent stream ended waiting for %s", what)
			if skip != nil && skip(p) {
				continue
			}
			return p
		case <-deadline:
			konnwire.Fail("timed out waiting for %s", what)
		}
	}
}

func listen(handle func(net.Conn)) string {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	konnwire.Check(err, "listen")
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	return lis.Addr().String()
}

func scenario(a agentStream) {
	echo := listen(func(c net.Conn) { io.Copy(c, c); c.Close() })
	closer := listen(func(c net.Conn) { c.Write([]byte("bye")); c.Close() })
	refusedLis, err := net.Listen("tcp", "127.0.0.1:0")
	konnwire.Check(err, "listen")
	refused := refusedLis.Addr().String()
	refusedLis.Close()

	a.send(konnwire.Packet{Type: konnwire.DialReq, Protocol: "tcp", Address: echo, Random: 11})
	p := a.next("DIAL_RSP 11", nil)
	konnwire.Expect(p.Type == konnwire.DialRsp && p.Random == 11 && p.Error == "" && p.ConnectID == 1,
		"first dial: %v (connectIDs start at 1)", p)
	fmt.Println("OK DIAL_RSP connectID=1")

	payload := konnwire.Pattern(1<<20, 5)
	go func() {
		for off := 0; off < len(payload); off += 100 * 1024 {
			end := off + 100*1024
			if end > len(payload) {
				end = len(payload)
			}
			a.send(konnwire.Packet{Type: konnwire.Data, ConnectID: 1, Data: payload[off:end]})
		}
	}()
	var echoed []byte
	for len(echoed) < len(payload) {
		p := a.next("DATA", nil)
		konnwire.Expect(p.Type == konnwire.Data && p.ConnectID == 1, "expected DATA 1, got %v", p)
		echoed = append(echoed, p.Data...)
	}
	konnwire.Expect(bytes.Equal(echoed, payload), "echoed bytes differ")
	fmt.Printf("OK DATA %d bytes each way\n", len(payload))

	a.send(konnwire.Packet{Type: konnwire.CloseReq, ConnectID: 1})
	p = a.next("CLOSE_RSP 1", nil)
	konnwire.Expect(p.Type == konnwire.CloseRsp && p.ConnectID == 1 && p.Error == "", "close answer %v", p)
	fmt.Println("OK CLOSE_RSP connectID=1")

	a.send(konnwire.Packet{Type: konnwire.CloseReq, ConnectID: 999})
	p = a.next("CLOSE_RSP 999", nil)
	konnwire.Expect(p.Type == konnwire.CloseRsp && p.ConnectID == 999, "close of an unknown id: %v", p)
	fmt.Printf("OK CLOSE_RSP for unknown connectID error=%q\n", p.Error)
	a.send(konnwire.Packet{Type: konnwire.Data, ConnectID: 998, Data: []byte("lost")})
	p = a.next("CLOSE_RSP 998", nil)
	konnwire.Expect(p.Type == konnwire.CloseRsp && p.ConnectID == 998 && p.Error != "", "DATA for an unknown id: %v", p)
	fmt.Printf("OK CLOSE_RSP for DATA on unknown connectID error=%q\n", p.Error)

	a.send(konnwire.Packet{Type: konnwire.DialReq, Protocol: "tcp", Address: closer, Random: 12})
	p = a.next("DIAL_RSP 12", nil)
	konnwire.Expect(p.Type == konnwire.DialRsp && p.Random == 12 && p.Error == "" && p.ConnectID == 2, "second dial: %v", p)
	var got []byte
	for {
		p = a.next("DATA bye, then CLOSE_RSP 2", nil)
		if p.Type == konnwire.Data && p.ConnectID == 2 {
			got = append(got, p.Data...)
			continue
		}
		konnwire.Expect(p.Type == konnwire.CloseRsp && p.ConnectID == 2, "after the destination closed: %v", p)
		break
	}
	konnwire.Expect(string(got) == "bye", "destination bytes %q", got)
	fmt.Println("OK unsolicited CLOSE_RSP connectID=2 after the destination closed")

	a.send(konnwire.Packet{Type: konnwire.DialReq, Protocol: "tcp", Address: refused, Random: 13})
	p = a.next("DIAL_RSP 13", nil)
	konnwire.Expect(p.Type == konnwire.DialRsp && p.Random == 13 && p.Error != "" && p.ConnectID == 0, "refused dial: %v", p)
	fmt.Printf("OK refused DIAL_RSP error=%q\n", p.Error)

	// DIAL_CLS right behind a DIAL_REQ: our agent never announces the dial
	// (or closes it at once); either way the stream stays usable.
	a.send(konnwire.Packet{Type: konnwire.DialReq, Protocol: "tcp", Address: echo, Random: 14})
	a.send(konnwire.Packet{Type: konnwire.DialCls, Random: 14})
	a.send(konnwire.Packet{Type: konnwire.DialReq, Protocol: "tcp", Address: echo, Random: 15})
	for {
		p = a.next("DIAL_RSP 15", nil)
		if p.Type == konnwire.DialRsp && p.Random == 15 {
			break
		}
		konnwire.Expect(p.Random == 14 || p.Type == konnwire.CloseRsp, "after DIAL_CLS: %v", p)
	}
	konnwire.Expect(p.Error == "" && p.ConnectID > 2, "dial after DIAL_CLS: %v", p)
	fmt.Printf("OK DIAL_CLS honoured, next connectID=%d\n", p.ConnectID)

	fmt.Println("AWAIT_DRAIN")
	os.Stdout.Sync()
	p = a.next("DRAIN", func(p konnwire.Packet) bool { return p.Type != konnwire.Drain })
	fmt.Println("OK DRAIN")
	fmt.Println("PASS")
	os.Exit(0)
}

func main() {
	cert := flag.String("cert", "", "server certificate")
	key := flag.String("key", "", "server key")
	ca := flag.String("ca", "", "CA of agent certificates")
	flag.Parse()
	konnwire.Register()

	lis, err := net.Listen("tcp", "127.0.0.1:0")
	konnwire.Check(err, "listen")
	first := make(chan agentStream, 1)
	connect := func(_ interface{}, stream grpc.ServerStream) error {
		md, _ := metadata.FromIncomingContext(stream.Context())
		fmt.Printf("AGENT agentid=%q agentidentifiers=%q\n", md.Get("agentid"), md.Get("agentidentifiers"))
		// Upstream's server takes at most one of each; its agents always
		// send both, agentidentifiers possibly empty.
		konnwire.Expect(len(md.Get("agentid")) == 1 && len(md.Get("agentidentifiers")) == 1,
			"agentid %q agentidentifiers %q", md.Get("agentid"), md.Get("agentidentifiers"))
		stream.SendHeader(metadata.Pairs("serverid", "go-proxy-server", "servercount", "1"))
		a := agentStream{stream, make(chan konnwire.Packet, 1024)}
		select {
		case first <- a:
		default:
			return nil // a duplicate: the scenario runs on the first stream
		}
		for {
			var b []byte
			if err := stream.RecvMsg(&b); err != nil {
				close(a.packets)
				return nil
			}
			p, err := konnwire.Decode(b)
			konnwire.Check(err, "decode")
			a.packets <- p
		}
	}
	server := grpc.NewServer(grpc.Creds(credentials.NewTLS(konnwire.TLSConfig(*cert, *key, *ca, "", true))))
	server.RegisterService(&grpc.ServiceDesc{
		ServiceName: "AgentService",
		HandlerType: (*interface{})(nil),
		Streams: []grpc.StreamDesc{{
			StreamName: "Connect", Handler: connect, ServerStreams: true, ClientStreams: true,
		}},
	}, struct{}{})
	go func() {
		select {
		case a := <-first:
			scenario(a)
		case <-time.After(60 * time.Second):
			konnwire.Fail("no agent connected")
		}
	}()
	fmt.Printf("LISTENING %s\n", lis.Addr())
	os.Stdout.Sync()
	konnwire.Check(server.Serve(lis), "serve")
}
