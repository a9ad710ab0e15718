//! rtnetlink for the sidecar: read links and addresses, add and remove
//! addresses, create, raise and delete links, and watch for changes.
//!
//! Owns: the crate's netlink sockets (through neli's plain blocking
//! `NlSocketHandle`, no background thread). Must not: decide anything; the
//! plan module says what to change, this module only does it and reports
//! the kernel's answer.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use neli::consts::nl::{NlmF, Nlmsg};
use neli::consts::rtnl::{Arphrd, Ifa, IfaF, Iff, Ifla, IflaInfo, RtAddrFamily, RtScope, Rtm};
use neli::consts::socket::NlFamily;
use neli::nl::{NlPayload, Nlmsghdr, NlmsghdrBuilder};
use neli::rtnl::{Ifaddrmsg, IfaddrmsgBuilder, Ifinfomsg, IfinfomsgBuilder, RtattrBuilder};
use neli::socket::synchronous::NlSocketHandle;
use neli::types::{Buffer, RtBuffer};
use neli::utils::Groups;

use super::plan::{Address, Link};
use crate::sys;

/// A netlink failure, with what we were doing.
#[derive(Debug)]
pub struct Error {
    pub action: String,
    pub kind: ErrorKind,
}

#[derive(Debug)]
pub enum ErrorKind {
    /// The kernel refused the request with this errno.
    Kernel(i32),
    /// The socket or message codec failed.
    Socket(String),
}

impl Error {
    fn socket(action: impl Into<String>, err: impl fmt::Display) -> Self {
        Error {
            action: action.into(),
            kind: ErrorKind::Socket(err.to_string()),
        }
    }

    /// The errno the kernel answered with, if it answered with one.
    pub fn errno(&self) -> Option<i32> {
        match self.kind {
            ErrorKind::Kernel(errno) => Some(errno),
            ErrorKind::Socket(_) => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Kernel(errno) => {
                write!(
                    f,
                    "{}: {}",
                    self.action,
                    io::Error::from_raw_os_error(*errno)
                )
            }
            ErrorKind::Socket(err) => write!(f, "{}: netlink: {err}", self.action),
        }
    }
}

impl std::error::Error for Error {}

/// A request socket: one request at a time, each answered before the next.
pub struct Netlink {
    socket: NlSocketHandle,
    seq: u32,
}

impl Netlink {
    pub fn open() -> Result<Self, Error> {
        let socket = NlSocketHandle::connect(NlFamily::Route, None, Groups::empty())
            .map_err(|e| Error::socket("opening rtnetlink socket", e))?;
        Ok(Netlink { socket, seq: 0 })
    }

    /// Every link: index, name, up.
    pub fn links(&mut self) -> Result<Vec<Link>, Error> {
        let request = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .build()
            .map_err(|e| Error::socket("building link dump", e))?;
        let replies: Vec<Ifinfomsg> =
            self.request(Rtm::Getlink, NlmF::DUMP, request, "listing links")?;
        Ok(replies.iter().filter_map(link_from).collect())
    }

    /// Every IPv4 and IPv6 address on every link.
    pub fn addresses(&mut self) -> Result<Vec<Address>, Error> {
        let request = IfaddrmsgBuilder::default()
            .ifa_family(RtAddrFamily::Unspecified)
            .ifa_prefixlen(0)
            .ifa_scope(RtScope::Universe)
            .ifa_index(0)
            .build()
            .map_err(|e| Error::socket("building address dump", e))?;
        let replies: Vec<Ifaddrmsg> =
            self.request(Rtm::Getaddr, NlmF::DUMP, request, "listing addresses")?;
        Ok(replies.iter().filter_map(address_from).collect())
    }

    /// Adds `ip/prefix` (scope global, no duplicate address detection) to
    /// the link. The kernel answers EEXIST when it is already there.
    pub fn add_address(&mut self, address: &Address) -> Result<(), Error> {
        let action = format!(
            "adding {}/{} to link {}",
            address.ip, address.prefix, address.index
        );
        let message = address_message(address, true).map_err(|e| Error::socket(&action, e))?;
        self.request::<Ifaddrmsg, Ifaddrmsg>(
            Rtm::Newaddr,
            NlmF::CREATE | NlmF::EXCL | NlmF::ACK,
            message,
            &action,
        )
        .map(drop)
    }

    pub fn delete_address(&mut self, address: &Address) -> Result<(), Error> {
        let action = format!(
            "removing {}/{} from link {}",
            address.ip, address.prefix, address.index
        );
        let message = address_message(address, false).map_err(|e| Error::socket(&action, e))?;
        self.request::<Ifaddrmsg, Ifaddrmsg>(Rtm::Deladdr, NlmF::ACK, message, &action)
            .map(drop)
    }

    /// Creates a link of type `dummy` named `name`, up.
    pub fn create_dummy(&mut self, name: &str) -> Result<(), Error> {
        let action = format!("creating dummy interface {name}");
        let message = dummy_message(name).map_err(|e| Error::socket(&action, e))?;
        self.request::<Ifinfomsg, Ifinfomsg>(
            Rtm::Newlink,
            NlmF::CREATE | NlmF::EXCL | NlmF::ACK,
            message,
            &action,
        )
        .map(drop)
    }

    pub fn set_up(&mut self, index: u32) -> Result<(), Error> {
        let action = format!("setting link {index} up");
        let message = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .ifi_index(index as i32)
            .up()
            .build()
            .map_err(|e| Error::socket(&action, e))?;
        self.request::<Ifinfomsg, Ifinfomsg>(Rtm::Newlink, NlmF::ACK, message, &action)
            .map(drop)
    }

    pub fn delete_link(&mut self, index: u32) -> Result<(), Error> {
        let action = format!("deleting link {index}");
        let message = IfinfomsgBuilder::default()
            .ifi_family(RtAddrFamily::Unspecified)
            .ifi_index(index as i32)
            .build()
            .map_err(|e| Error::socket(&action, e))?;
        self.request::<Ifinfomsg, Ifinfomsg>(Rtm::Dellink, NlmF::ACK, message, &action)
            .map(drop)
    }

    /// Sends one request and collects the payloads of its answer, up to the
    /// final ACK (plain requests) or DONE (dumps). A kernel error becomes
    /// `ErrorKind::Kernel`.
    fn request<Q, R>(
        &mut self,
        kind: Rtm,
        flags: NlmF,
        payload: Q,
        action: &str,
    ) -> Result<Vec<R>, Error>
    where
        Q: neli::Size + neli::ToBytes + fmt::Debug,
        R: neli::Size + neli::FromBytesWithInput<Input = usize> + fmt::Debug + Clone,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let message = NlmsghdrBuilder::default()
            .nl_type(kind)
            .nl_flags(NlmF::REQUEST | flags)
            .nl_seq(seq)
            .nl_payload(NlPayload::Payload(payload))
            .build()
            .map_err(|e| Error::socket(action, e))?;
        self.socket
            .send(&message)
            .map_err(|e| Error::socket(action, e))?;
        let dump = flags.contains(NlmF::DUMP);
        let mut out = Vec::new();
        loop {
            let (messages, _) = self
                .socket
                .recv::<u16, R>()
                .map_err(|e| Error::socket(action, e))?;
            for message in messages {
                let message: Nlmsghdr<u16, R> = message.map_err(|e| Error::socket(action, e))?;
                if *message.nl_seq() != seq {
                    continue; // a stale answer to an earlier, abandoned request
                }
                match message.nl_payload() {
                    NlPayload::Err(err) => {
                        return Err(Error {
                            action: action.to_string(),
                            kind: ErrorKind::Kernel(-*err.error()),
                        });
                    }
                    NlPayload::Ack(_) => return Ok(out),
                    NlPayload::Payload(_) if *message.nl_type() == u16::from(Nlmsg::Done) => {
                        return Ok(out);
                    }
                    NlPayload::Payload(payload) => out.push(payload.clone()),
                    NlPayload::DumpExtAck(_) | NlPayload::Empty => {
                        if dump && *message.nl_type() == u16::from(Nlmsg::Done) {
                            return Ok(out);
                        }
                    }
                }
            }
        }
    }
}

fn link_from(msg: &Ifinfomsg) -> Option<Link> {
    let index = u32::try_from(*msg.ifi_index()).ok()?;
    let name = msg.rtattrs().iter().find_map(|attr| {
        (*attr.rta_type() == Ifla::Ifname).then(|| {
            let bytes: &[u8] = attr.rta_payload().as_ref();
            String::from_utf8_lossy(bytes)
                .trim_end_matches('\0')
                .to_string()
        })
    })?;
    let loopback = *msg.ifi_type() == Arphrd::Loopback;
    Some(Link {
        index,
        name,
        up: msg.ifi_flags().contains(Iff::UP),
        loopback,
    })
}

fn address_from(msg: &Ifaddrmsg) -> Option<Address> {
    let family = *msg.ifa_family();
    // IFA_LOCAL is the address itself on IPv4 (IFA_ADDRESS is the peer on
    // point-to-point links); IPv6 only sends IFA_ADDRESS.
    let wanted = |ty: &Ifa| *ty == Ifa::Local || *ty == Ifa::Address;
    let mut local = None;
    let mut address = None;
    for attr in msg.rtattrs().iter().filter(|a| wanted(a.rta_type())) {
        let ip = ip_from_bytes(family, attr.rta_payload().as_ref())?;
        if *attr.rta_type() == Ifa::Local {
            local = Some(ip);
        } else {
            address = Some(ip);
        }
    }
    let flags = msg.ifa_flags();
    Some(Address {
        index: *msg.ifa_index(),
        ip: local.or(address)?,
        prefix: *msg.ifa_prefixlen(),
        global: *msg.ifa_scope() == RtScope::Universe,
        usable: !flags.contains(IfaF::DADFAILED),
    })
}

fn ip_from_bytes(family: RtAddrFamily, bytes: &[u8]) -> Option<IpAddr> {
    match family {
        RtAddrFamily::Inet => {
            let octets: [u8; 4] = bytes.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        RtAddrFamily::Inet6 => {
            let octets: [u8; 16] = bytes.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn attr<T: neli::consts::rtnl::RtaType>(
    ty: T,
    bytes: Vec<u8>,
) -> Result<neli::rtnl::Rtattr<T, Buffer>, String> {
    RtattrBuilder::default()
        .rta_type(ty)
        .rta_payload(Buffer::from(bytes))
        .build()
        .map_err(|e| e.to_string())
}

fn address_message(address: &Address, adding: bool) -> Result<Ifaddrmsg, String> {
    let family = match address.ip {
        IpAddr::V4(_) => RtAddrFamily::Inet,
        IpAddr::V6(_) => RtAddrFamily::Inet6,
    };
    let mut attrs = RtBuffer::new();
    attrs.push(attr(Ifa::Local, ip_bytes(address.ip))?);
    attrs.push(attr(Ifa::Address, ip_bytes(address.ip))?);
    // No duplicate address detection: the address must be usable at once,
    // and it is meant to exist on every node.
    let flags = if adding && address.ip.is_ipv6() {
        IfaF::NODAD
    } else {
        IfaF::empty()
    };
    IfaddrmsgBuilder::default()
        .ifa_family(family)
        .ifa_prefixlen(address.prefix)
        .ifa_flags(flags)
        .ifa_scope(if address.global {
            RtScope::Universe
        } else {
            RtScope::Host
        })
        .ifa_index(address.index)
        .rtattrs(attrs)
        .build()
        .map_err(|e| e.to_string())
}

fn dummy_message(name: &str) -> Result<Ifinfomsg, String> {
    let mut name_bytes = name.as_bytes().to_vec();
    name_bytes.push(0);
    let kind = attr(IflaInfo::Kind, b"dummy\0".to_vec())?;
    let mut kind_bytes = io::Cursor::new(Vec::new());
    neli::ToBytes::to_bytes(&kind, &mut kind_bytes).map_err(|e| e.to_string())?;
    let mut attrs = RtBuffer::new();
    attrs.push(attr(Ifla::Ifname, name_bytes)?);
    attrs.push(attr(Ifla::Linkinfo, kind_bytes.into_inner())?);
    IfinfomsgBuilder::default()
        .ifi_family(RtAddrFamily::Unspecified)
        .up()
        .rtattrs(attrs)
        .build()
        .map_err(|e| e.to_string())
}

/// What a change notification was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An address went away (RTM_DELADDR).
    AddressRemoved,
    /// A link changed or went away (RTM_NEWLINK / RTM_DELLINK).
    LinkChanged,
    /// Notifications were lost (the socket overflowed): resynchronise.
    Overflow,
}

/// A socket subscribed to address and link notifications.
pub struct Watcher {
    socket: NlSocketHandle,
}

impl Watcher {
    pub fn open() -> Result<Self, Error> {
        let groups = Groups::new_groups(&[
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV6_IFADDR,
        ]);
        let socket = NlSocketHandle::connect(NlFamily::Route, None, groups)
            .map_err(|e| Error::socket("subscribing to address and link events", e))?;
        // Room for bursts; an overflow still only costs a resync.
        let _ = socket.set_recv_buffer_size(1 << 20);
        Ok(Watcher { socket })
    }

    /// Reads every notification already queued, without blocking, and
    /// returns the ones that matter to us (new addresses are our own doing
    /// or harmless, and are dropped).
    pub fn drain(&self) -> Result<Vec<Event>, Error> {
        let mut events = Vec::new();
        while sys::poll_readable(&[self.as_raw_fd()], Some(Duration::ZERO))
            .map_err(|e| Error::socket("polling netlink events", e))?[0]
        {
            match self.socket.recv::<u16, Buffer>() {
                Ok((messages, _)) => {
                    for message in messages.flatten() {
                        let ty = *message.nl_type();
                        if ty == u16::from(Rtm::Deladdr) {
                            events.push(Event::AddressRemoved);
                        } else if ty == u16::from(Rtm::Newlink) || ty == u16::from(Rtm::Dellink) {
                            events.push(Event::LinkChanged);
                        }
                    }
                }
                Err(neli::err::SocketError::Io(err))
                    if err.raw_os_error() == Some(libc::ENOBUFS) =>
                {
                    events.push(Event::Overflow);
                }
                Err(err) => return Err(Error::socket("reading netlink events", err)),
            }
        }
        Ok(events)
    }
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}
