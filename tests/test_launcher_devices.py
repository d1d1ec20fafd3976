"""The first devices of chapter III, register by register: UART, i8042, exit door."""
from __future__ import annotations

from hypothesis import given, strategies as st

from lguest.drivers.exitdoor import ExitDoor
from lguest.drivers.i8042 import I8042
from lguest.drivers.uart import *  # noqa: F403


def uart():
    out, line = [], []
    return Uart8250(output=out.append, irq=line.append), out, line


def test_linux_autoconfig_finds_a_16550a():
    u, _, _ = uart()
    u.write(UART_IER, 1, 0)
    assert u.read(UART_IER) == 0
    u.write(UART_IER, 1, 0x0F)
    assert u.read(UART_IER) == 0x0F
    u.write(UART_FCR, 1, UART_FCR_ENABLE_FIFO)
    assert u.read(UART_IIR) >> 6 == 3
    u.write(UART_MCR, 1, UART_MCR_LOOP | UART_MCR_OUT2 | UART_MCR_RTS)
    assert u.read(UART_MSR) & 0xF0 == 0x90
    u.write(UART_TX, 1, 0x5A)                       # loopback: what we send comes back
    assert u.read(UART_LSR) & UART_LSR_DR and u.read(UART_RX) == 0x5A


def test_divisor_latch_hides_data_and_ier():
    u, out, _ = uart()
    u.write(UART_LCR, 1, UART_LCR_DLAB)
    u.write(UART_DLL, 1, 1)
    u.write(UART_DLM, 1, 0)
    u.write(UART_LCR, 1, 3)
    assert out == [] and u.read(UART_IER) == 0


def test_thre_interrupt_rises_on_enable_and_after_each_byte():
    u, out, line = uart()
    u.write(UART_IER, 1, UART_IER_THRI)
    assert line == [True] and u.read(UART_IIR) & 0x0F == UART_IIR_THRI
    assert line == [True, False] and u.read(UART_IIR) & 1 == UART_IIR_NO_INT
    u.write(UART_TX, 1, ord("x"))
    assert out == [b"x"] and line == [True, False, True]


def test_received_bytes_raise_the_line_until_drained():
    u, _, line = uart()
    u.write(UART_IER, 1, UART_IER_RDI)
    u.receive(b"ab")
    assert line == [True] and u.read(UART_IIR) & 0x0F == UART_IIR_RDI
    assert bytes([u.read(UART_RX), u.read(UART_RX)]) == b"ab"
    assert line == [True, False] and not u.read(UART_LSR) & UART_LSR_DR


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 255), st.booleans()), max_size=60))
def test_any_register_traffic_keeps_the_line_honest(ops):
    u, _, line = uart()
    for offset, value, is_write in ops:
        u.write(offset, 1, value) if is_write else u.read(offset)
        assert u.level == (u.pending() != UART_IIR_NO_INT)
        assert all(a != b for a, b in zip(line, line[1:]))   # only changes are reported


def test_i8042_answers_linux_at_once_and_resets():
    resets = []
    kbc = I8042(on_reset=lambda: resets.append(1))
    kbc.write(4, 1, 0xAA)
    assert kbc.read(4) & 1 and kbc.read(0) == 0x55 and not kbc.read(4) & 1
    kbc.write(4, 1, 0xD3), kbc.write(0, 1, 0x5A)
    assert kbc.read(0) != 0x5A                         # no mouse behind the loop
    assert not kbc.read(4) & 0x02                      # the input buffer is never busy
    kbc.write(4, 1, 0xFE)
    assert resets == [1]


def test_exit_door():
    said = []
    door = ExitDoor(on_exit=said.append)
    assert door.read(0) == ord("L")
    door.write(0, 1, 0x1FF)
    assert said == [0xFF]


def test_acpi_power_management_registers():
    from lguest.drivers.power import PM1_CONTROL, PM1_ENABLE, SCI_EN, PowerManagement
    off = []
    pm = PowerManagement(on_poweroff=lambda: off.append(True))
    assert pm.read(PM1_CONTROL, 2) == SCI_EN          # ACPI mode, always
    pm.write(PM1_ENABLE, 2, 1 << 5)                   # GBL_EN: Linux reads it back
    assert pm.read(PM1_ENABLE, 2) == 1 << 5
    pm.write(PM1_CONTROL, 2, 5 << 10)                 # the sleep type alone: not yet
    pm.write(PM1_CONTROL, 2, 3 << 10 | 1 << 13)       # S3 is not ours to offer
    assert off == []
    pm.write(PM1_CONTROL, 2, 5 << 10 | 1 << 13)       # S5 and SLP_EN: off
    assert off == [True]
