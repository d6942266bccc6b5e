"""Make the ParaView GUI's main window fill the screen (X11), from inside the GUI (state_files/pvstate.py).

ParaView 5.11 opens its main window at a size of its own (1152x762 on a 1600x1000 screen, 1000x660 on
others) and its Python has no handle on Qt, so this talks to the X server itself (libX11 through ctypes; no
Python package needed): it finds this process's main window (``_NET_WM_PID``, not a dialog, the largest one
shown) and, with a window manager (EWMH), asks it to maximize the window, which keeps it on its monitor and
clear of panels; without one (Xvfb) it moves and resizes the window to the work area, or the whole screen.
Anything unexpected (no X display, no libX11, no window yet) leaves the window as it is: this is cosmetic.
Runs in ParaView's Python and in ours (tests import ``plan``); stdlib only.
"""
import ctypes
import ctypes.util
import os

# Xlib constants (X.h, Xatom.h)
XA_CARDINAL, XA_WINDOW, XA_STRING = 6, 33, 31
ANY_PROPERTY_TYPE = 0
IS_VIEWABLE = 2
CLIENT_MESSAGE = 33
SUBSTRUCTURE_NOTIFY, SUBSTRUCTURE_REDIRECT = 1 << 19, 1 << 20
NET_WM_STATE_ADD = 1


def plan(screen, workarea=None, window_manager=False):
    """How to fill ``screen`` (width, height): ("maximize", None) with a window manager (it knows the monitors
    and the panels); else ("resize", (x, y, width, height)): the published work area, or the whole screen."""
    if window_manager:
        return "maximize", None
    if workarea and workarea[2] > 0 and workarea[3] > 0:
        return "resize", tuple(int(v) for v in workarea[:4])
    return "resize", (0, 0, int(screen[0]), int(screen[1]))


class _Attributes(ctypes.Structure):  # XWindowAttributes
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("width", ctypes.c_int), ("height", ctypes.c_int),
                ("border_width", ctypes.c_int), ("depth", ctypes.c_int), ("visual", ctypes.c_void_p),
                ("root", ctypes.c_ulong), ("class_", ctypes.c_int), ("bit_gravity", ctypes.c_int),
                ("win_gravity", ctypes.c_int), ("backing_store", ctypes.c_int), ("backing_planes", ctypes.c_ulong),
                ("backing_pixel", ctypes.c_ulong), ("save_under", ctypes.c_int), ("colormap", ctypes.c_ulong),
                ("map_installed", ctypes.c_int), ("map_state", ctypes.c_int), ("all_event_masks", ctypes.c_long),
                ("your_event_mask", ctypes.c_long), ("do_not_propagate_mask", ctypes.c_long),
                ("override_redirect", ctypes.c_int), ("screen", ctypes.c_void_p)]


class _ClientMessage(ctypes.Structure):  # XClientMessageEvent, format 32
    _fields_ = [("type", ctypes.c_int), ("serial", ctypes.c_ulong), ("send_event", ctypes.c_int),
                ("display", ctypes.c_void_p), ("window", ctypes.c_ulong), ("message_type", ctypes.c_ulong),
                ("format", ctypes.c_int), ("data", ctypes.c_long * 5)]


class _Event(ctypes.Union):  # XEvent: 24 longs
    _fields_ = [("xclient", _ClientMessage), ("pad", ctypes.c_long * 24)]


_ERROR_HANDLER = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def _xlib():
    lib = ctypes.CDLL(ctypes.util.find_library("X11") or "libX11.so.6")
    P, U, L, I = ctypes.c_void_p, ctypes.c_ulong, ctypes.c_long, ctypes.c_int
    sig = {"XOpenDisplay": (P, [ctypes.c_char_p]), "XCloseDisplay": (I, [P]), "XDefaultScreen": (I, [P]),
           "XDefaultRootWindow": (U, [P]), "XDisplayWidth": (I, [P, I]), "XDisplayHeight": (I, [P, I]),
           "XInternAtom": (U, [P, ctypes.c_char_p, I]), "XFree": (I, [P]), "XSync": (I, [P, I]),
           "XQueryTree": (I, [P, U, ctypes.POINTER(U), ctypes.POINTER(U), ctypes.POINTER(ctypes.POINTER(U)),
                              ctypes.POINTER(ctypes.c_uint)]),
           "XGetWindowProperty": (I, [P, U, U, L, L, I, U, ctypes.POINTER(U), ctypes.POINTER(I), ctypes.POINTER(U),
                                      ctypes.POINTER(U), ctypes.POINTER(ctypes.c_void_p)]),
           "XGetWindowAttributes": (I, [P, U, ctypes.POINTER(_Attributes)]),
           "XMoveResizeWindow": (I, [P, U, I, I, ctypes.c_uint, ctypes.c_uint]),
           "XSendEvent": (I, [P, U, I, L, ctypes.POINTER(_Event)]),
           "XSetErrorHandler": (P, [P])}
    for name, (res, args) in sig.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


def _longs(x, dpy, window, prop, kind=ANY_PROPERTY_TYPE, n=64):
    """A format-32 property as a list of ints (C longs in Xlib's reply), or None when it is not set."""
    actual, fmt, count, after = ctypes.c_ulong(), ctypes.c_int(), ctypes.c_ulong(), ctypes.c_ulong()
    data = ctypes.c_void_p()
    if x.XGetWindowProperty(dpy, window, prop, 0, n, 0, kind, ctypes.byref(actual), ctypes.byref(fmt),
                            ctypes.byref(count), ctypes.byref(after), ctypes.byref(data)) != 0:
        return None
    try:
        if not actual.value:
            return None
        if fmt.value != 32:
            return []
        return list(ctypes.cast(data, ctypes.POINTER(ctypes.c_long))[:count.value])
    finally:
        if data.value:
            x.XFree(data)


def _top_levels(x, dpy, root, atom):
    clients = _longs(x, dpy, root, atom(b"_NET_CLIENT_LIST"), XA_WINDOW, 4096)
    if clients:  # a window manager lists the client windows (its frames are the root's children)
        return [c & 0xFFFFFFFF for c in clients]
    r, p, children, n = ctypes.c_ulong(), ctypes.c_ulong(), ctypes.POINTER(ctypes.c_ulong)(), ctypes.c_uint()
    if not x.XQueryTree(dpy, root, ctypes.byref(r), ctypes.byref(p), ctypes.byref(children), ctypes.byref(n)):
        return []
    try:
        return [children[i] for i in range(n.value)]
    finally:
        if children:
            x.XFree(children)


def main_window(x, dpy, root, pid):
    """(window, width, height) of ``pid``'s largest shown top-level window that is not a dialog, or None."""
    def atom(name):
        return x.XInternAtom(dpy, name, 0)

    best = None
    for w in _top_levels(x, dpy, root, atom):
        if (_longs(x, dpy, w, atom(b"_NET_WM_PID"), XA_CARDINAL) or [None])[0] != pid:
            continue
        if _longs(x, dpy, w, atom(b"WM_TRANSIENT_FOR")) is not None:  # a dialog (the welcome screen)
            continue
        if _longs(x, dpy, w, atom(b"WM_CLASS"), XA_STRING) is None:  # Qt's helper windows have no class
            continue
        a = _Attributes()
        if not x.XGetWindowAttributes(dpy, w, ctypes.byref(a)) or a.map_state != IS_VIEWABLE:
            continue
        if best is None or a.width * a.height > best[1] * best[2]:
            best = (w, a.width, a.height)
    return best


def fill_screen(pid=None):
    """Fill the screen with ``pid``'s (default: this process's) main window; returns what was done, or None."""
    if not os.environ.get("DISPLAY"):
        return None
    try:
        x = _xlib()
    except (OSError, AttributeError):
        return None
    dpy = x.XOpenDisplay(None)
    if not dpy:
        return None
    handler = _ERROR_HANDLER(lambda d, e: 0)  # a window gone meanwhile: an X error must not end ParaView
    previous = x.XSetErrorHandler(ctypes.cast(handler, ctypes.c_void_p))
    try:
        root = x.XDefaultRootWindow(dpy)
        scr = x.XDefaultScreen(dpy)
        screen = (x.XDisplayWidth(dpy, scr), x.XDisplayHeight(dpy, scr))
        found = main_window(x, dpy, root, os.getpid() if pid is None else pid)
        if found is None:
            return None
        window = found[0]
        wm = _longs(x, dpy, root, x.XInternAtom(dpy, b"_NET_SUPPORTING_WM_CHECK", 0), XA_WINDOW) is not None
        area = _longs(x, dpy, root, x.XInternAtom(dpy, b"_NET_WORKAREA", 0), XA_CARDINAL)
        how, geometry = plan(screen, area[:4] if area and len(area) >= 4 else None, wm)
        if how == "maximize":
            ev = _Event()
            m = ev.xclient
            m.type, m.send_event, m.display, m.window, m.format = CLIENT_MESSAGE, 1, dpy, window, 32
            m.message_type = x.XInternAtom(dpy, b"_NET_WM_STATE", 0)
            m.data[:] = [NET_WM_STATE_ADD, x.XInternAtom(dpy, b"_NET_WM_STATE_MAXIMIZED_VERT", 0),
                         x.XInternAtom(dpy, b"_NET_WM_STATE_MAXIMIZED_HORZ", 0), 1, 0]
            x.XSendEvent(dpy, root, 0, SUBSTRUCTURE_REDIRECT | SUBSTRUCTURE_NOTIFY, ctypes.byref(ev))
        else:
            x.XMoveResizeWindow(dpy, window, *geometry)
        x.XSync(dpy, 0)
        return {"window": window, "how": how, "geometry": geometry, "screen": screen, "before": found[1:]}
    finally:
        x.XSync(dpy, 0)  # our errors, if any, reach our handler before the old one is back
        x.XSetErrorHandler(previous)
        x.XCloseDisplay(dpy)
