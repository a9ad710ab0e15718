// An upstream-style proxy-agent written with grpc-go, against our
// proxy-server's agent port (mTLS), for tests/grpc_go_interop.rs. It opens
// /AgentService/Connect with agentid/agentidentifiers metadata, reads
// serverid/servercount from the response headers, dials destinations with
// net.Dial (connectIDs from 1), pumps DATA, answers CLOSE_REQ with
// CLOSE_RSP and sends an unsolicited CLOSE_RSP when a destination closes.
// Prints one line per event ("SERVER id count", "DIAL ok|error ...",
// "CLOSE_REQ id", "DEST_CLOSED id") and runs until killed or the stream ends.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"konnwire"
)

type agent struct {
	stream grpc.ClientStream
	sendMu sync.Mutex
	mu     sync.Mutex
	conns  map[int64]net.Conn
	nextID int64
}

func (a *agent) send(p konnwire.Packet) {
	b := p.Encode()
	a.sendMu.Lock()
	defer a.sendMu.Unlock()
	if err := a.stream.SendMsg(&b); err != nil {
		fmt.Printf("SEND_FAILED %v %v\n", p, err)
	}
}

func (a *agent) dial(p konnwire.Packet) {
	c, err := net.DialTimeout("tcp", p.Address, 5*time.Second)
	if err != nil {
		fmt.Printf("DIAL error %s %v\n", p.Address, err)
		a.send(konnwire.Packet{Type: konnwire.DialRsp, Random: p.Random, Error: err.Error()})
		return
	}
	a.mu.Lock()
	a.nextID++
	id := a.nextID
	a.conns[id] = c
	a.mu.Unlock()
	fmt.Printf("DIAL ok %s %d\n", p.Address, id)
	a.send(konnwire.Packet{Type: konnwire.DialRsp, Random: p.Random, ConnectID: id})
	go func() {
		buf := make([]byte, 32*1024)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				a.send(konnwire.Packet{Type: konnwire.Data, ConnectID: id, Data: append([]byte(nil), buf[:n]...)})
			}
			if err != nil {
				break
			}
		}
		a.mu.Lock()
		_, open := a.conns[id]
		delete(a.conns, id)
		a.mu.Unlock()
		if open {
			// The destination closed: tell the server unasked.
			fmt.Printf("DEST_CLOSED %d\n", id)
			a.send(konnwire.Packet{Type: konnwire.CloseRsp, ConnectID: id})
		}
	}()
}

func (a *agent) conn(id int64) net.Conn {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.conns[id]
}

func main() {
	target := flag.String("target", "", "HOST:PORT of the agent port")
	cert := flag.String("cert", "", "agent certificate")
	key := flag.String("key", "", "agent key")
	ca := flag.String("ca", "", "CA of the server certificate")
	id := flag.String("agent-id", "go-agent", "agentid")
	identifiers := flag.String("identifiers", "host=localhost", "agentidentifiers")
	flag.Parse()
	konnwire.Register()

	dialCtx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	creds := credentials.NewTLS(konnwire.TLSConfig(*cert, *key, *ca, "127.0.0.1", false))
	conn, err := grpc.DialContext(dialCtx, *target, grpc.WithTransportCredentials(creds), grpc.WithBlock())
	konnwire.Check(err, "dial")
	// The stream lives until the test kills us (bounded below).
	ctx, stop := context.WithTimeout(context.Background(), 5*time.Minute)
	defer stop()
	ctx = metadata.AppendToOutgoingContext(ctx, "agentid", *id, "agentidentifiers", *identifiers)
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{StreamName: "Connect", ServerStreams: true, ClientStreams: true}, "/AgentService/Connect")
	konnwire.Check(err, "open Connect")
	header, err := stream.Header()
	konnwire.Check(err, "response headers")
	ids, counts := header.Get("serverid"), header.Get("servercount")
	konnwire.Expect(len(ids) == 1 && len(counts) == 1, "serverid %v servercount %v", ids, counts)
	fmt.Printf("SERVER %s %s\n", ids[0], counts[0])
	os.Stdout.Sync()

	a := &agent{stream: stream, conns: map[int64]net.Conn{}}
	for {
		var b []byte
		if err := stream.RecvMsg(&b); err != nil {
			fmt.Printf("STREAM_END %v\n", err)
			return
		}
		p, err := konnwire.Decode(b)
		konnwire.Check(err, "decode")
		switch p.Type {
		case konnwire.DialReq:
			go a.dial(p)
		case konnwire.Data:
			if c := a.conn(p.ConnectID); c != nil {
				c.Write(p.Data)
			} else {
				a.send(konnwire.Packet{Type: konnwire.CloseRsp, ConnectID: p.ConnectID, Error: "unknown connectID"})
			}
		case konnwire.CloseReq:
			fmt.Printf("CLOSE_REQ %d\n", p.ConnectID)
			a.mu.Lock()
			c := a.conns[p.ConnectID]
			delete(a.conns, p.ConnectID)
			a.mu.Unlock()
			rsp := konnwire.Packet{Type: konnwire.CloseRsp, ConnectID: p.ConnectID}
			if c == nil {
				rsp.Error = "unknown connectID"
			} else {
				c.Close()
			}
			a.send(rsp)
		case konnwire.DialCls:
			fmt.Printf("DIAL_CLS %d\n", p.Random)
		default:
			fmt.Printf("UNEXPECTED %v\n", p)
		}
	}
}
