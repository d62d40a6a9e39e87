// Runs OHIF's own code headless in Node: the published @ohif/core and
// @ohif/extension-cornerstone-dicom-sr bundles (pinned in package.json) on the
// real Cornerstone3D, its adapters and dcmjs.
//
// What is real: OHIF core's DicomMetadataStore, MetadataProvider (also
// registered as Cornerstone's metadata provider, as OHIF's cornerstone
// extension does), DisplaySetService, MeasurementService and
// CustomizationService; the SR extension's SOP class handler, load() and its
// DICOMSRDisplay tool; Cornerstone3D's annotation store and adapters.
// What is a stand-in (only what the code calls, nothing else):
//   - the extension manager: the SR SOP class handler modules and one data source;
//   - the data source: OHIF's local-file data source's getImageIdsForDisplaySet
//     (one imageId per image instance, its `url`);
//   - the image display set that OHIF's default stack handler would make
//     (displaySetInstanceUID, UIDs, images/instances);
//   - React/i18n/UI modules the bundle imports for its viewport component,
//     which load() never runs;
//   - a handful of browser globals (OHIF core's keyboard hotkeys need
//     `window`/`document`/`navigator` to load; its pub/sub dispatches events
//     on `document.body`, here a plain EventTarget; Cornerstone's annotation
//     store tests for `HTMLDivElement`).
// Files are read the way OHIF reads local files: dcmjs readFile ->
// naturalizeDataset, `url` = a dicomfile: imageId, the meta header in `_meta`.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import util from 'node:util';

import * as csAdapters from '@cornerstonejs/adapters';
import * as csCore from '@cornerstonejs/core';
import * as csMetadata from '@cornerstonejs/metadata';
import * as csTools from '@cornerstonejs/tools';
import dcmjs from 'dcmjs';
import * as glMatrix from 'gl-matrix';

const require = createRequire(import.meta.url);

export const SR_EXTENSION_ID = '@ohif/extension-cornerstone-dicom-sr';
// The longitudinal mode lists the 3D SR handler before the plain one.
export const SR_HANDLER_IDS = [
  `${SR_EXTENSION_ID}.sopClassHandlerModule.dicom-sr-3d`,
  `${SR_EXTENSION_ID}.sopClassHandlerModule.dicom-sr`,
];
// Annotation types OHIF's cornerstone extension maps for the
// 'Cornerstone3DTools'@'0.1' measurement source (initMeasurementService).
const CORNERSTONE_SOURCE = ['Cornerstone3DTools', '0.1'];
const MAPPED_ANNOTATION_TYPES = [
  'Length', 'Crosshairs', 'Bidirectional', 'EllipticalROI', 'CircleROI', 'ArrowAnnotate', 'CobbAngle',
  'Angle', 'RectangleROI', 'PlanarFreehandROI', 'SplineROI', 'CalibrationLine', 'LivewireContour',
  'Probe', 'UltrasoundDirectionalTool', 'UltrasoundPleuraBLineTool', 'SegmentBidirectional',
];

/** stdout carries only the JSON result; every library's console chatter goes
 * to stderr, and warnings are also kept so the result can report them. */
export function captureConsole() {
  const warnings = [];
  const toStderr = (...args) => process.stderr.write(`${util.format(...args)}\n`);
  console.log = console.info = console.debug = console.trace = toStderr;
  console.warn = console.error = (...args) => {
    warnings.push(util.format(...args).split('\n')[0].slice(0, 300));
    toStderr(...args);
  };
  return warnings;
}

function loadUmd(packageName, deps) {
  const source = fs.readFileSync(require.resolve(packageName), 'utf8');
  const module = { exports: {} };
  const requireDep = name => {
    if (!(name in deps)) throw new Error(`${packageName} requires ${name}, which the harness does not provide`);
    return deps[name];
  };
  new Function('module', 'exports', 'require', source)(module, module.exports, requireDep);
  return module.exports;
}

function browserGlobals() {
  globalThis.window ??= globalThis;
  globalThis.self ??= globalThis;
  // OHIF's pub/sub services dispatch a CustomEvent on document.body.
  globalThis.document ??= { addEventListener() {}, removeEventListener() {}, body: new EventTarget() };
  // Cornerstone's addAnnotation tests its selector against the DOM class; with
  // no element given it files the annotation by frame of reference, as in a browser.
  globalThis.HTMLDivElement ??= class HTMLDivElement {};
  if (typeof globalThis.navigator === 'undefined') {
    globalThis.navigator = { platform: 'Linux', userAgent: 'node' };
  }
}

export function loadOhif() {
  browserGlobals();
  const ohifCore = loadUmd('@ohif/core', {
    '@cornerstonejs/core': csCore,
    '@cornerstonejs/metadata': csMetadata,
    dcmjs,
    'gl-matrix': glMatrix,
  });
  const srExtension = loadUmd(SR_EXTENSION_ID, {
    '@ohif/core': ohifCore,
    '@cornerstonejs/adapters': csAdapters,
    'gl-matrix': glMatrix,
    '@cornerstonejs/core': csCore,
    '@cornerstonejs/tools': csTools,
    // Only its enums reach load(); the viewport component is never mounted.
    '@ohif/extension-cornerstone': {
      Enums: { CORNERSTONE_3D_TOOLS_SOURCE_NAME: CORNERSTONE_SOURCE[0], CORNERSTONE_3D_TOOLS_SOURCE_VERSION: CORNERSTONE_SOURCE[1] },
    },
    '@ohif/i18n': { t: key => key },
    '@ohif/ui-next': {},
    '@ohif/core/src/contextProviders/SystemProvider': {},
  });
  return { ohifCore, srExtension };
}

/** Naturalized instances, as OHIF's local-file loader makes them. */
export function readDicomFiles(paths) {
  const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
  return paths.map((path, index) => {
    const bytes = fs.readFileSync(path);
    const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    const dicomData = DicomMessage.readFile(buffer);
    const dataset = DicomMetaDictionary.naturalizeDataset(dicomData.dict);
    dataset.url = `dicomfile:${index}`;
    dataset._meta = DicomMetaDictionary.namifyDataset(dicomData.meta);
    dataset.AvailableTransferSyntaxUID ??= dataset._meta.TransferSyntaxUID?.Value?.[0];
    return dataset;
  });
}

/** OHIF core services wired the way the viewer wires them, plus the stand-ins above. */
export function createApp(ohifCore, srExtension) {
  const metadataProvider = ohifCore.classes.MetadataProvider;
  csCore.metaData.addProvider(metadataProvider.get.bind(metadataProvider), 9999);

  const dataSource = {
    getImageIdsForDisplaySet(displaySet) {
      return (displaySet.images ?? []).map(instance => instance.url);
    },
    getImageIdsForInstance({ instance }) {
      return instance.url;
    },
    retrieve: {
      bulkDataURI() {
        throw new Error('local files carry their bulk data inline');
      },
    },
  };
  const measurementService = new ohifCore.MeasurementService();
  const source = measurementService.createSource(...CORNERSTONE_SOURCE);
  for (const annotationType of MAPPED_ANNOTATION_TYPES) {
    measurementService.addMapping(source, annotationType, [], () => null, () => null);
  }
  const services = {
    displaySetService: new ohifCore.DisplaySetService(),
    measurementService,
    customizationService: new ohifCore.CustomizationService({ configuration: {}, commandsManager: null }),
  };
  const servicesManager = { services };
  const modules = new Map();
  const extensionManager = {
    getDataSources: () => [dataSource],
    getActiveDataSource: () => [dataSource],
    getModuleEntry: id => modules.get(id),
  };
  const extension = srExtension.default;
  extension.preRegistration({ servicesManager, configuration: {} });
  for (const handler of extension.getSopClassHandlerModule({ servicesManager, extensionManager })) {
    modules.set(`${extension.id}.sopClassHandlerModule.${handler.name}`, handler);
  }
  services.displaySetService.init(extensionManager, SR_HANDLER_IDS);
  return { services, servicesManager, extensionManager, dataSource, metadataProvider };
}

/** Put instances in OHIF's metadata store and map their imageIds to UIDs, as
 * the local data source's series metadata retrieve does. */
export function storeInstances(ohifCore, instances) {
  const bySeries = new Map();
  for (const instance of instances) {
    const key = instance.SeriesInstanceUID;
    if (!bySeries.has(key)) bySeries.set(key, []);
    bySeries.get(key).push(instance);
  }
  for (const series of bySeries.values()) {
    ohifCore.DicomMetadataStore.addInstances(series, true);
  }
  for (const instance of instances) {
    instance.imageId = instance.url;
    ohifCore.classes.MetadataProvider.addImageIdToUIDs(instance.url, {
      StudyInstanceUID: instance.StudyInstanceUID,
      SeriesInstanceUID: instance.SeriesInstanceUID,
      SOPInstanceUID: instance.SOPInstanceUID,
    });
  }
  return [...bySeries.values()];
}

/** The display set OHIF's default stack SOP class handler makes for a series of images. */
export function imageDisplaySet(ohifCore, series) {
  const first = series[0];
  return {
    displaySetInstanceUID: ohifCore.utils.guid(),
    StudyInstanceUID: first.StudyInstanceUID,
    SeriesInstanceUID: first.SeriesInstanceUID,
    SeriesNumber: first.SeriesNumber,
    SeriesDescription: first.SeriesDescription,
    Modality: first.Modality,
    SOPClassUID: first.SOPClassUID,
    FrameOfReferenceUID: first.FrameOfReferenceUID,
    SOPClassHandlerId: '@ohif/extension-default.sopClassHandlerModule.stack',
    isReconstructable: false,
    isDerivedDisplaySet: false,
    numImageFrames: series.length,
    images: series,
    instances: series,
    instance: first,
  };
}

export { csAdapters, csCore, csTools, dcmjs };
